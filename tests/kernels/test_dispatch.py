"""One dispatch point per op: 'auto' picks torch on CPU tensors, explicit backends are honoured or
refused with a clear error, optional CUDA packages are imported only when asked for."""
import importlib.util

import pytest
import torch

from megaflow.kernels import triton_utils
from megaflow.kernels.attention import attention
from megaflow.kernels.cross_entropy import cross_entropy
from megaflow.kernels.norm import layer_norm, rms_norm
from megaflow.kernels.rope import apply_rotary, rotary_cos_sin
from megaflow.kernels.swiglu import swiglu

Q = torch.randn(1, 2, 8, 16)
COS, SIN = rotary_cos_sin(8, 16)
W = torch.ones(16)
CALLS = {
    "attention": lambda be: attention(Q, Q, Q, backend=be),
    "layer_norm": lambda be: layer_norm(Q, W, W, backend=be),
    "rms_norm": lambda be: rms_norm(Q, W, backend=be),
    "rope": lambda be: apply_rotary(Q, COS, SIN, backend=be),
    "swiglu": lambda be: swiglu(Q, Q, backend=be),
    "cross_entropy": lambda be: cross_entropy(Q, torch.zeros(1, 2, 8, dtype=torch.long), backend=be),
}


@pytest.mark.parametrize("op", sorted(CALLS))
def test_auto_is_torch_on_cpu(op):
    assert torch.equal(CALLS[op]("auto"), CALLS[op]("torch"))


@pytest.mark.parametrize("op", sorted(CALLS))
def test_unknown_backend_is_refused(op):
    with pytest.raises(ValueError, match="unknown .*backend 'bogus'"):
        CALLS[op]("bogus")


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash_attn is installed")
def test_flash_attn_backend_without_the_package():
    with pytest.raises(RuntimeError, match="flash_attn is not installed"):
        CALLS["attention"]("flash-attn")


@pytest.mark.skipif(importlib.util.find_spec("apex") is not None, reason="apex is installed")
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_apex_backend_without_the_package(op):
    with pytest.raises(RuntimeError, match="apex is not installed"):
        CALLS[op]("apex")


@pytest.mark.parametrize("op", ["rope", "swiglu"])
@pytest.mark.parametrize("name", ["flash-attn", "apex"])
def test_ops_without_a_package_version_take_their_default(op, name):
    """The model hands its attention backend to rope and swiglu as well."""
    assert torch.equal(CALLS[op](name), CALLS[op]("auto"))


def test_triton_on_cpu_without_interpreter_names_the_fix(monkeypatch):
    monkeypatch.setattr(triton_utils, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        triton_utils.check_tensors("attention", Q)
