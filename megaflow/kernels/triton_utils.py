"""What every Triton kernel module shares: the interpreter switch, device checks, launch sizes.

Imported only by the `*_triton.py` modules, which the op files import lazily when the Triton backend
is chosen: megaflow imports without triton installed, and TRITON_INTERPRET=1 only has to be set
before the first Triton-backed call (the @triton.jit decorators read it when they run).
"""
from __future__ import annotations

import functools

import torch
import triton

from megaflow.parallel.device import multiprocessor_count

# Read once, when the kernels below and in the sibling modules are being defined: a kernel is an
# interpreted function or a compiled one for its whole life, so this is the value that matters.
INTERPRET: bool = bool(triton.knobs.runtime.interpret)


def check_tensors(op: str, *tensors: torch.Tensor | None) -> None:
    """Refuse, with a clear message, what the kernels cannot run on."""
    for t in tensors:
        if t is None:
            continue
        if not INTERPRET and not t.is_cuda:
            raise RuntimeError(
                f"{op}: the Triton backend needs CUDA tensors (got {t.device}). On CPU use backend "
                "'torch', or set TRITON_INTERPRET=1 before the first Triton-backed call (tests do).")
        if INTERPRET and t.is_cuda:
            raise RuntimeError(f"{op}: TRITON_INTERPRET=1 is set but the tensor is on {t.device}")


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 products for fp32 inputs (tf32 would make the Triton
    backend less accurate than the torch one it replaces); fp16/bf16 operands ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return multiprocessor_count(device_index)


def num_programs_for_rows(n_rows: int, device: torch.device, interpret_programs: int = 3) -> int:
    """How many persistent programs a row-reduction backward (norm weight grads) launches: a few
    per SM on a GPU; in the interpreter a small odd count, so tests cover uneven row chunks."""
    if INTERPRET or device.type != "cuda":
        return max(1, min(n_rows, interpret_programs))
    return max(1, min(n_rows, 4 * _sm_count(device.index if device.index is not None else 0)))


def row_kernel_warps(tile_elems: int) -> int:
    """Warps for a row-reduction tile (norms): one warp per 256 elements, 1..16."""
    return min(max(tile_elems // 256, 1), 16)
