"""Optimizer construction: AdamW, SGD or Muon (optim/muon.py) over the data-parallel gradient buffers, plain or ZeRO
(optim/distrib_optimizer.py); no weight decay on biases and norm weights (as Megatron)."""
from __future__ import annotations

import functools

import torch
from torch import nn

from megaflow.optim.distrib_optimizer import MegaflowOptimizer
from megaflow.parallel import state


def model_chunks(model) -> list:
    """A model, or the list of model chunks of an interleaved pipeline stage, as a list."""
    return list(model) if isinstance(model, (list, tuple, nn.ModuleList)) else [model]


def no_weight_decay(name: str, param) -> bool:
    return param.ndim == 1 or name.endswith(".bias")


def fused_adam_supported(device) -> bool:
    """torch's fused AdamW (one kernel over all tensors: each element read and written once, where the
    for-loop implementation makes ~8 passes) exists for this device type (CPU and CUDA in torch >= 2.4).
    It is what Megatron-LM (apex/Transformer Engine FusedAdam) and the transformers Trainer use."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    return torch.device(device).type in _get_fused_kernels_supported_devices()


def torch_optimizer_factory(cfg):
    t = cfg.training
    if t.optimizer == "adam":
        return functools.partial(torch.optim.AdamW, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                 fused=fused_adam_supported(state.get().device) or None)
    return functools.partial(torch.optim.SGD, lr=t.lr, momentum=t.sgd_momentum)


def build_optimizer(cfg, model) -> MegaflowOptimizer:
    """Gradient buffers for every chunk of `model` (hooks registered on its parameters, whose data
    move into the buffers) and the optimizer over them."""
    t, p = cfg.training, cfg.parallel
    chunks = model_chunks(model)
    decay = {param: 0.0 if no_weight_decay(name, param) else t.weight_decay
             for chunk in chunks for name, param in chunk.named_parameters()}
    if t.optimizer == "muon":
        from megaflow.optim.muon import build_muon_optimizer
        optimizer = build_muon_optimizer(cfg, chunks, decay.__getitem__)
    else:
        optimizer = MegaflowOptimizer(chunks, torch_optimizer_factory(cfg), decay.__getitem__,
                                      sharded=p.use_distributed_optimizer, zero_stage=p.zero_stage,
                                      bucket_size=p.ddp_bucket_size, overlap_grad_reduce=p.overlap_grad_reduce,
                                      overlap_param_gather=p.overlap_param_gather,
                                      reshard_after_forward=p.reshard_after_forward)
    if cfg.performance.gradient_accumulation_fusion:
        optimizer.sync.enable_gradient_accumulation_fusion()
    return optimizer
