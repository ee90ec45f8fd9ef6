"""Mixture of Experts: router (router.py), token dispatcher (dispatcher.py, the only place MoE
communicates), experts (experts.py), the layer composing them with an optional shared expert
(moe_layer.py), the aux-loss scaler (aux_loss.py) and per-step statistics and the expert-bias update
(stats.py)."""
from megaflow.layers.moe.aux_loss import set_scale as set_aux_loss_scale  # noqa: F401
from megaflow.layers.moe.moe_layer import MoELayer  # noqa: F401
from megaflow.layers.moe.stats import collect_stats, moe_layers, update_expert_biases  # noqa: F401
