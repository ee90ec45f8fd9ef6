"""Backend choice for the fused ops: one rule, used by every kernel's dispatch function."""
from __future__ import annotations

import importlib.util

import torch


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """The precision the plain-torch references compute in: fp32, or fp64 when given fp64 (tests
    use fp64 to hold fp32 kernels to fp32 accuracy)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


# Backends that live in optional CUDA packages, and the package each imports (lazily, when used).
OPTIONAL_BACKENDS = {"flash-attn": "flash_attn", "apex": "apex"}


def resolve_backend(requested: str, tensor: torch.Tensor, optional_package: str | None = None) -> str:
    """'auto' means Triton on a CUDA tensor (when triton is installed) and torch otherwise.

    An explicit backend is honoured or refused with a clear error, never silently replaced;
    `optional_package` is the package this op's optional backend needs (flash_attn, apex).
    Names the op does not know are returned as given, for the op to refuse."""
    if requested == "auto":
        return "triton" if tensor.is_cuda and triton_available() else "torch"
    if requested == "triton" and not triton_available():
        raise RuntimeError("backend 'triton' requested but the triton package is not installed")
    package = OPTIONAL_BACKENDS.get(requested)
    if package is not None and package == optional_package and importlib.util.find_spec(package) is None:
        raise RuntimeError(f"backend {requested!r} requested but {package} is not installed")
    return requested
