"""Backend choice for the fused ops: one rule, used by every kernel's dispatch function."""
from __future__ import annotations

import importlib.util

import torch

_TRITON_BACKED = ("triton",)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(requested: str, tensor: torch.Tensor, optional_package: str | None = None) -> str:
    """'auto' means Triton on a CUDA tensor (when triton is installed) and torch otherwise.

    An explicit backend is honoured or refused with a clear error, never silently replaced."""
    if requested == "auto":
        return "triton" if tensor.is_cuda and triton_available() else "torch"
    if requested == "triton" and not triton_available():
        raise RuntimeError("backend 'triton' requested but the triton package is not installed")
    if optional_package and requested not in ("torch", "triton") \
            and importlib.util.find_spec(optional_package) is None:
        raise RuntimeError(f"backend {requested!r} requested but {optional_package} is not installed")
    return requested
