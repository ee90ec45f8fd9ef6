"""Triton LayerNorm/RMSNorm (optionally fused with the residual add) vs an fp32/fp64 reference, with
the torch backend in the same dtype as the yardstick. Checked: y, the new residual h, and the
gradients of x, weight, bias and residual, with and without a gradient arriving at h."""
import pytest
import torch

from kernel_numerics import check_all, leaf, ref_dtype
from megaflow.kernels.norm import layer_norm, rms_norm


def run(kind, backend, x, w, b, r, gy, gh):
    """y (and h) for the given inputs, and the gradients of sum(y*gy) + sum(h*gh)."""
    x, w, b, r = (None if t is None else leaf(t) for t in (x, w, b, r))
    if kind == "layer":
        out = layer_norm(x, w, b, 1e-5, backend=backend, residual=r)
    else:
        out = rms_norm(x, w, 1e-5, backend=backend, residual=r)
    y, h = (out, None) if r is None else out
    loss = (y.double() * gy).sum()
    if h is not None and gh is not None:
        loss = loss + (h.double() * gh).sum()
    wrt = [t for t in (x, w, b, r) if t is not None]
    outs = [y.detach()] + ([] if h is None else [h.detach()])
    return outs + list(torch.autograd.grad(loss, wrt))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("shape,residual,grad_h", [
    ((3, 7, 50), None, False),     # 21 rows over 3 backward programs: uneven row chunks
    ((4, 129), None, False),       # hidden one past a power of two
    ((5, 3), None, False),         # a tiny odd hidden size
    ((3, 7, 50), "same", True),    # fused residual add, h used downstream
    ((6, 48), "same", False),      # fused residual add, h unused (its gradient is None)
    ((6, 48), "fp32", True),       # fp32 residual stream with a low-precision branch
    ((5, 8, 64), "same", True),    # 14-row chunks per backward program: two row tiles each
])
def test_norm_matches_reference(kind, shape, residual, grad_h, dtype):
    n = shape[-1]
    # With an fp32 residual stream the norm's parameters are fp32 too (torch's CPU LayerNorm
    # refuses fp16 parameters on fp32 input).
    stream = torch.float32 if residual == "fp32" else dtype
    x = torch.randn(shape).to(dtype)
    w = (1 + 0.2 * torch.randn(n)).to(stream)
    b = (0.2 * torch.randn(n)).to(stream) if kind == "layer" else None
    r = None if residual is None else (torch.randn(shape) * 2).to(stream)
    gy = torch.randn(shape, dtype=torch.float64)
    gh = torch.randn(shape, dtype=torch.float64) if grad_h else None
    rd = ref_dtype(dtype)
    up = lambda t: None if t is None else t.to(rd)  # noqa: E731
    ref = run(kind, "torch", up(x), up(w), up(b), up(r), gy, gh)
    tri = run(kind, "triton", x, w, b, r, gy, gh)
    pt = run(kind, "torch", x, w, b, r, gy, gh)
    names = ["y"] + (["h"] if r is not None else []) + ["dx", "dweight"] + (["dbias"] if b is not None else []) \
        + (["dresidual"] if r is not None else [])
    assert len(tri) == len(names)
    check_all(names, tri, pt, ref, dtype)


def test_layer_norm_without_bias():
    x, w = torch.randn(9, 40), 1 + 0.1 * torch.randn(40)
    gy = torch.randn(9, 40, dtype=torch.float64)
    tri = run("layer", "triton", x, w, None, None, gy, None)
    ref = run("layer", "torch", x.double(), w.double(), None, None, gy, None)
    for got, want in zip(tri, ref):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


def test_residual_output_is_the_sum():
    x, r, w = torch.randn(4, 33), torch.randn(4, 33), torch.ones(33)
    y, h = rms_norm(x, w, 1e-6, backend="triton", residual=r)
    assert torch.equal(h, x + r)
    torch.testing.assert_close(y, rms_norm(x + r, w, 1e-6, backend="torch"))


def test_too_wide_rows_are_refused():
    x = torch.randn(2, 40000, dtype=torch.float16)
    with pytest.raises(ValueError, match="too large"):
        layer_norm(x, torch.ones(40000, dtype=torch.float16), None, backend="triton")
