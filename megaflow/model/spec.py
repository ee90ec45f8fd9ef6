"""Layer spec: which attention and which MLP a transformer layer gets. --multi-latent-attention picks
MLA (model/mla.py) over standard attention (model/attention.py); --moe-layer-freq marks the MoE layers,
every other layer (and every layer of a dense model) gets the dense MLP. The model file learns nothing
about routing or latents."""
from __future__ import annotations

from torch import nn

from megaflow.config import parse_layer_freq
from megaflow.layers.mlp import MLP


def is_moe_layer(cfg, layer_number: int) -> bool:
    """Multi-token-prediction layers (numbers past the model's) take the last layer's MLP, as Megatron does."""
    e, n = cfg.moe, cfg.model.num_layers
    return e.num_experts is not None and parse_layer_freq(e.moe_layer_freq, n)[min(layer_number, n - 1)] == 1


def build_mlp(cfg, layer_number: int, output_std: float) -> nn.Module:
    if is_moe_layer(cfg, layer_number):
        from megaflow.layers.moe import MoELayer
        return MoELayer(cfg, layer_number, output_std)
    return MLP(cfg, output_std)


def build_attention(cfg, output_std: float) -> nn.Module:
    if cfg.model.multi_latent_attention:
        from megaflow.model.mla import MultiLatentAttention
        return MultiLatentAttention(cfg, output_std)
    from megaflow.model.attention import SelfAttention
    return SelfAttention(cfg, output_std)
