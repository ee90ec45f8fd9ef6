"""Triton RoPE and SwiGLU vs an fp32/fp64 reference, with the torch backend in the same dtype as the
yardstick (rule in kernel_numerics.py). RoPE: x [b, heads, s, d] with cos/sin tables [s, d] or
per-sample [b, 1, s, d]; SwiGLU: gate, up [..., f] -> [..., f]."""
import pytest
import torch

from kernel_numerics import check_all, ref_dtype, run_grad
from megaflow.kernels.rope import apply_rotary, apply_rotary_reference, rotary_cos_sin
from megaflow.kernels.swiglu import swiglu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,n,s,d,per_sample", [
    (2, 3, 5, 24, False),   # half = 12: padded to 16 columns
    (1, 2, 37, 64, False),
    (2, 2, 9, 2, False),    # one rotated pair
    (2, 3, 11, 16, True),   # per-sample positions (reset at document boundaries)
])
def test_rope_matches_reference(b, n, s, d, per_sample, dtype):
    pos = torch.stack([torch.arange(s), torch.arange(s) % 4]) if per_sample else None
    cos, sin = rotary_cos_sin(s, d, base=500.0, position_ids=pos)
    x = (torch.randn(b, s, n, d) * 3).to(dtype).transpose(1, 2)  # [b, s, n, d] storage, as q/k come
    dout = torch.randn(b, n, s, d)
    rd = ref_dtype(dtype)
    ref = run_grad(lambda t: apply_rotary_reference(t, cos.to(rd), sin.to(rd)), [x.to(rd)], dout)
    tri = run_grad(lambda t: apply_rotary(t, cos, sin, backend="triton"), [x], dout)
    pt = run_grad(lambda t: apply_rotary(t, cos, sin, backend="torch"), [x], dout)
    check_all(["out", "dx"], [tri[0]] + tri[1], [pt[0]] + pt[1], [ref[0]] + ref[1], dtype)


def test_rope_matches_hugging_face_convention():
    """rotate_half with angles repeated over both halves: position p rotates pair (i, i + d/2) by p*theta_i."""
    d, s = 8, 6
    cos, sin = rotary_cos_sin(s, d)
    x = torch.randn(1, 1, s, d)
    out = apply_rotary(x, cos, sin, backend="triton")
    theta = 10000.0 ** (-torch.arange(0, d, 2).double() / d)
    ang = torch.arange(s).double()[:, None] * theta
    x1, x2 = x[0, 0, :, : d // 2].double(), x[0, 0, :, d // 2:].double()
    want = torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1)
    torch.testing.assert_close(out[0, 0].double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 7, 37), (5, 64), (1, 1)])
def test_swiglu_matches_reference(shape, dtype):
    gate, up = ((torch.randn(shape) * 3).to(dtype) for _ in range(2))
    dout = torch.randn(shape)
    rd = ref_dtype(dtype)
    ref = run_grad(lambda g, u: swiglu(g, u, backend="torch"), [gate.to(rd), up.to(rd)], dout)
    tri = run_grad(lambda g, u: swiglu(g, u, backend="triton"), [gate, up], dout)
    pt = run_grad(lambda g, u: swiglu(g, u, backend="torch"), [gate, up], dout)
    check_all(["out", "dgate", "dup"], [tri[0]] + tri[1], [pt[0]] + pt[1], [ref[0]] + ref[1], dtype)


def test_swiglu_refuses_mismatched_blocks():
    with pytest.raises(ValueError, match=r"gate \(2, 3\) and up \(2, 4\)"):
        swiglu(torch.randn(2, 3), torch.randn(2, 4))
