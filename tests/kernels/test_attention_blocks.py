"""Block attention by global position (kernels/attention_blocks.py), the piece ring attention and
packed sequences are built from: output, LSE and gradients against materialised fp64 attention with
an explicit mask, for causal offsets in every relation (diagonal, left of it, straddling, partly or
wholly invisible), with and without documents (cu_seqlens), with grouped-query heads; and partial
results over split key blocks merge to the whole. The Triton kernels (attention_block_triton.py, fp32
in the interpreter, 16×16 tiles) are held to the same reference, on lengths that cross several tiles."""
import pytest
import torch

from megaflow.kernels.attention_blocks import block_backward, block_forward, merge_partials

CU = torch.tensor([[0, 5, 13, 24, 24], [0, 24, 24, 24, 24]])   # sample 0: three documents
SCALE = 0.3


def masked_attention(q, k, v, q_start, k_start, cu):
    """Materialised reference: (out, lse) with rows that see nothing at 0 / -inf."""
    b, n, sq, _ = q.shape
    sk, g = k.shape[2], n // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    qp, kp = torch.arange(q_start, q_start + sq), torch.arange(k_start, k_start + sk)
    allowed = (kp[None, :] <= qp[:, None]).expand(b, sq, sk).clone()
    if cu is not None:
        for i in range(b):
            allowed[i] &= torch.bucketize(qp, cu[i], right=True)[:, None] == \
                torch.bucketize(kp, cu[i], right=True)[None, :]
    s = ((q @ k.transpose(-1, -2)) * SCALE).masked_fill(~allowed[:, None], float("-inf"))
    lse = s.logsumexp(-1)
    p = torch.where(torch.isinf(lse)[..., None], torch.zeros_like(s), (s - lse[..., None]).exp())
    return p @ v, lse


def inputs(sq, sk, b=2, n=4, g=2, d=8):
    return [torch.randn(b, h, s, d, dtype=torch.float64) for h, s in ((n, sq), (g, sk), (g, sk))]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("q_start,sq,k_start,sk", [
    (0, 24, 0, 24),     # the whole sequence: plain causal
    (8, 8, 0, 8),       # keys wholly before the queries: unmasked
    (16, 8, 0, 16),     # keys before and up to the queries' start
    (4, 6, 2, 12),      # keys straddle the queries on both sides
    (12, 12, 0, 6),     # more queries than keys
    (10, 8, 10, 8),     # the diagonal block of a chunk
])
def test_block_matches_masked_attention(q_start, sq, k_start, sk, packed):
    cu = CU if packed else None
    q, k, v = (t.requires_grad_() for t in inputs(sq, sk))
    o_ref, lse_ref = masked_attention(q, k, v, q_start, k_start, cu)
    o, lse = block_forward(q.detach(), k.detach(), v.detach(), q_start, k_start, SCALE, cu)
    torch.testing.assert_close(o, o_ref.detach(), rtol=0, atol=1e-12)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
    seen = ~torch.isinf(lse_ref)
    torch.testing.assert_close(lse[seen], lse_ref[seen].detach(), rtol=0, atol=1e-12)
    do = torch.randn_like(o_ref) * seen[..., None]
    o_ref.backward(do)
    grads = block_backward(do, q.detach(), k.detach(), v.detach(), o, torch.where(seen, lse, 0.0),
                           q_start, k_start, SCALE, cu)
    for got, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(got, t.grad, rtol=0, atol=1e-12)


CU40 = torch.tensor([[0, 3, 19, 20, 37, 40], [0, 40, 40, 40, 40, 40]])


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("q_start,sq,k_start,sk", [
    (0, 40, 0, 40),     # several 16-tiles, diagonal crossing tile edges
    (24, 16, 0, 24),    # a later chunk over an earlier one (the ring's unmasked case)
    (20, 20, 8, 30),    # straddling on both sides
    (8, 7, 16, 16),     # keys partly after every query: rows that see nothing
])
def test_triton_block_matches_masked_attention(q_start, sq, k_start, sk, packed):
    cu = CU40 if packed else None
    q, k, v = (t.requires_grad_() for t in inputs(sq, sk))
    o_ref, lse_ref = masked_attention(q, k, v, q_start, k_start, cu)
    seen = ~torch.isinf(lse_ref)
    got = block_forward(*(t.detach().float() for t in (q, k, v)), q_start, k_start, SCALE, cu, backend="triton")
    if not seen.any():
        assert got is None
        return
    o, lse = got
    assert o.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(o.double(), o_ref.detach(), rtol=0, atol=1e-5)
    assert torch.equal(torch.isinf(lse), ~seen)
    torch.testing.assert_close(lse[seen].double(), lse_ref[seen].detach(), rtol=0, atol=1e-5)
    do = torch.randn_like(o_ref) * seen[..., None]
    o_ref.backward(do)
    grads = block_backward(do.float(), *(t.detach().float() for t in (q, k, v)), o_ref.detach().float(),
                           torch.where(seen, lse_ref, 0.0).detach().float(), q_start, k_start, SCALE, cu,
                           backend="triton")
    for got, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(got.double(), t.grad, rtol=0, atol=2e-5)


def test_keys_after_every_query_are_skipped():
    q, k, v = inputs(8, 8)
    assert block_forward(q, k, v, 0, 16, SCALE) is None


@pytest.mark.parametrize("packed", [False, True])
def test_split_key_blocks_merge_to_the_whole(packed):
    cu = CU if packed else None
    q, k, v = inputs(12, 24)
    whole = block_forward(q, k, v, 12, 0, SCALE, cu)
    acc = block_forward(q, k[:, :, :10], v[:, :, :10], 12, 0, SCALE, cu)
    acc = block_forward(q, k[:, :, 10:], v[:, :, 10:], 12, 10, SCALE, cu, out=acc)
    torch.testing.assert_close(acc[0], whole[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(acc[1], whole[1], rtol=0, atol=1e-12)


def test_merge_keeps_rows_that_see_nothing_empty():
    o, lse = torch.zeros(1, 1, 2, 4), torch.full((1, 1, 2), float("-inf"))
    merge_partials(o, lse, torch.ones(1, 1, 2, 4), torch.tensor([[[0.0, float("-inf")]]]))
    assert lse[0, 0, 0] == 0 and torch.isinf(lse[0, 0, 1])
    assert torch.equal(o[0, 0, 0], torch.ones(4)) and not o.isnan().any()
