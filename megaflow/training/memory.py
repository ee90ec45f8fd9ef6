"""Bytes per rank held by model states: parameters, gradients, optimizer state."""
from __future__ import annotations

import torch

# Optimizer state tensors per parameter element, in fp32: Adam's m and v; SGD's momentum.
_STATE_FP32_PER_ELEMENT = {torch.optim.AdamW: 2, torch.optim.Adam: 2, torch.optim.SGD: 1}


def model_state_bytes(model, optimizer) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    grad_bytes = sum(p.numel() * 4 for p in params)  # gradients are kept in fp32
    per_element = _STATE_FP32_PER_ELEMENT.get(type(optimizer), 2)
    optim_bytes = sum(p.numel() * 4 * per_element for p in params)
    return {"parameters": param_bytes, "gradients": grad_bytes, "optimizer": optim_bytes,
            "num_parameters": sum(p.numel() for p in params)}


def memory_report(model, optimizer) -> str:
    b = model_state_bytes(model, optimizer)
    mib = 1024 ** 2
    return (f"model states on this rank: {b['num_parameters']:,} parameters | parameters "
            f"{b['parameters'] / mib:.1f} MiB | gradients {b['gradients'] / mib:.1f} MiB | optimizer "
            f"{b['optimizer'] / mib:.1f} MiB")
