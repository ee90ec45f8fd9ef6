"""Triton grouped GEMM (forward, input and weight gradients) vs an fp64/fp32 reference loop, with the
torch backend in the same dtype as the yardstick (kernel_numerics.py's rule). Variable rows per expert,
experts without rows, sizes that are not multiples of the 32-wide tiles."""
import pytest
import torch

from kernel_numerics import check_all, ref_dtype, run_grad
from megaflow.kernels.grouped_gemm import grouped_linear, grouped_linear_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("counts, k, n", [
    ([5, 0, 40, 3], 24, 20),      # an empty expert; a run longer than one 32-row tile
    ([33, 1], 48, 64),            # reduction over two tiles, a single-row expert
    ([0, 0, 7], 8, 36),           # leading empty experts
])
def test_grouped_gemm_matches_reference(counts, k, n, dtype):
    x = torch.randn(sum(counts), k).to(dtype)
    w = (torch.randn(len(counts), n, k) / k ** 0.5).to(dtype)
    dy = torch.randn(sum(counts), n)
    rd = ref_dtype(dtype)
    ref = run_grad(lambda a, b: grouped_linear_reference(a, b, counts), [x.to(rd), w.to(rd)], dy)
    tri = run_grad(lambda a, b: grouped_linear(a, b, counts, backend="triton"), [x, w], dy)
    pt = run_grad(lambda a, b: grouped_linear(a, b, counts, backend="torch"), [x, w], dy)
    check_all(["y", "dx", "dw"], [tri[0]] + tri[1], [pt[0]] + pt[1], [ref[0]] + ref[1], dtype)
    empty = [e for e, c in enumerate(counts) if c == 0]
    assert all(tri[1][1][e].abs().sum() == 0 for e in empty)


def test_moe_layer_with_triton_grouped_gemm_equals_torch():
    from megaflow.config import parse_args
    from megaflow.layers.moe import MoELayer
    from megaflow.model.init import initialize_weights
    base = ["--model-style", "llama", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "8",
            "--num-experts", "4", "--moe-ffn-hidden-size", "16", "--moe-grouped-gemm"]
    x = torch.randn(8, 2, 32)
    outs = []
    for backend in ("torch", "triton"):
        layer = MoELayer(parse_args(base + ["--moe-grouped-gemm-backend", backend]), 0, 0.02)
        initialize_weights(layer, 5)
        y = layer(x)
        y.square().sum().backward()
        outs.append((y.detach(), {n: p.grad for n, p in layer.named_parameters()}))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    for name, g in outs[0][1].items():
        torch.testing.assert_close(g, outs[1][1][name], rtol=1e-5, atol=1e-6, msg=name)
