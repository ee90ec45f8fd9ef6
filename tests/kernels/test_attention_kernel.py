"""Triton flash attention vs an fp32/fp64 reference, with the torch backend (SDPA) in the same dtype
as the yardstick. Shapes: q [b, h, s, d], k/v [b, kvh, s, d]. Interpreter blocks are 32x16 (fwd,
dQ) and 16x32 (dK/dV), so the odd lengths below end in partial blocks on both axes."""
import pytest
import torch

from kernel_numerics import check_all, ref_dtype, run_grad
from megaflow.kernels import attention_triton as kt
from megaflow.kernels.attention import attention

NAMES = ("out", "dq", "dk", "dv")


def attention_math(q, k, v, causal, scale, keep=None, dropout_p=0.0):
    """Materialised attention in the inputs' dtype (use fp64/fp32 inputs for the reference);
    causal is top-left aligned (query i sees keys 0..i), keep is an optional dropout mask."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    if causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    p = scores.softmax(-1)
    if keep is not None:
        p = p * keep / (1 - dropout_p)
    return p @ v


def compare(q, k, v, causal=True, softmax_scale=None, dtype=torch.float32):
    q, k, v = (t.to(dtype) for t in (q, k, v))
    do = torch.randn(q.shape)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    rd = ref_dtype(dtype)
    ref = run_grad(lambda a, b, c: attention_math(a, b, c, causal, scale), [t.to(rd) for t in (q, k, v)], do)
    tri = run_grad(lambda a, b, c: attention(a, b, c, causal, 0.0, softmax_scale, backend="triton"), [q, k, v], do)
    pt = run_grad(lambda a, b, c: attention(a, b, c, causal, 0.0, softmax_scale, backend="torch"), [q, k, v], do)
    check_all(NAMES, [tri[0]] + tri[1], [pt[0]] + pt[1], [ref[0]] + ref[1], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,h,kvh,s,d,causal", [
    (2, 4, 4, 37, 16, True),    # multi-head, odd length
    (1, 4, 2, 50, 24, True),    # GQA 2, head dim not a power of two (padded to 32)
    (2, 6, 2, 33, 32, False),   # GQA 3, non-causal, one past a block boundary
    (1, 4, 1, 64, 16, True),    # multi-query (GQA 4), length a multiple of every block
    (1, 2, 2, 1, 16, True),     # a single token
])
def test_attention_matches_reference(b, h, kvh, s, d, causal, dtype):
    compare(torch.randn(b, h, s, d), torch.randn(b, kvh, s, d), torch.randn(b, kvh, s, d), causal, dtype=dtype)


def test_head_dim_128_and_custom_scale():
    compare(torch.randn(1, 2, 19, 128), torch.randn(1, 1, 19, 128), torch.randn(1, 1, 19, 128),
            causal=True, softmax_scale=0.05)


def test_cross_attention_lengths_non_causal():
    """s_q != s_k (non-causal only): the key loop's tail block is masked independently of queries."""
    compare(torch.randn(1, 2, 20, 16), torch.randn(1, 1, 45, 16), torch.randn(1, 1, 45, 16), causal=False)


def test_strided_inputs():
    """q/k/v as the model makes them: [b, s, heads, d] storage viewed as [b, heads, s, d]."""
    q = torch.randn(2, 29, 4, 16).transpose(1, 2)
    k = torch.randn(2, 29, 2, 16).transpose(1, 2)
    v = torch.randn(2, 29, 2, 16).transpose(1, 2)
    assert not q.is_contiguous()
    compare(q, k, v, causal=True)


def test_logsumexp_saved_by_forward():
    q, k, v = torch.randn(1, 2, 37, 16), torch.randn(1, 1, 37, 16), torch.randn(1, 1, 37, 16)
    seed = kt.draw_dropout_seed(q.device, 0.0)
    _, lse = kt.flash_attn_forward(q, k, v, True, 0.25, 0.0, seed)
    scores = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) * 0.25
    scores = scores.masked_fill(torch.ones(37, 37, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse.double(), scores.logsumexp(-1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_dropout_matches_masked_reference(causal):
    """Dropout: the kernels' Philox mask, reproduced by dropout_keep_mask from the same seed,
    applied to the reference; the backward must regenerate exactly that mask."""
    b, h, kvh, s, d, p = 1, 4, 2, 37, 16, 0.3
    q, k, v, do = torch.randn(b, h, s, d), torch.randn(b, kvh, s, d), torch.randn(b, kvh, s, d), torch.randn(b, h, s, d)
    torch.manual_seed(7)
    keep = kt.dropout_keep_mask(kt.draw_dropout_seed(q.device, p), b, h, s, s, p)
    assert 0.6 < keep.float().mean().item() < 0.8
    torch.manual_seed(7)  # the Function draws its seed the same way
    tri = run_grad(lambda a, b_, c: attention(a, b_, c, causal, p, backend="triton"), [q, k, v], do)
    ref = run_grad(lambda a, b_, c: attention_math(a, b_, c, causal, d ** -0.5, keep.double(), p),
                   [t.double() for t in (q, k, v)], do)
    for name, got, want in zip(NAMES, [tri[0]] + tri[1], [ref[0]] + ref[1]):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5, msg=name)


def test_dropout_differs_between_calls():
    q = torch.randn(1, 2, 17, 16)
    a = attention(q, q[:, :1], q[:, :1], True, 0.5, backend="triton")
    b = attention(q, q[:, :1], q[:, :1], True, 0.5, backend="triton")
    assert not torch.equal(a, b)


@pytest.mark.parametrize("kwargs,match", [
    (dict(q=(1, 2, 8, 16), k=(1, 2, 9, 16), causal=True), "as many queries as keys"),
    (dict(q=(1, 3, 8, 16), k=(1, 2, 8, 16), causal=True), "multiple"),
    (dict(q=(1, 2, 8, 160), k=(1, 2, 8, 160), causal=True), "head_dim"),
])
def test_refuses_unsupported_shapes(kwargs, match):
    q, k = torch.randn(kwargs["q"]), torch.randn(kwargs["k"])
    with pytest.raises(ValueError, match=match):
        attention(q, k, k, kwargs["causal"], backend="triton")
