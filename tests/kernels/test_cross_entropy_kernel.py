"""Triton cross entropy and the vocab-parallel building blocks vs an fp32/fp64 reference.
logits [..., V], labels [...]; interpreter chunks are 128 columns, so V = 301 crosses three."""
import pytest
import torch

from kernel_numerics import check_all, ref_dtype, run_grad
from megaflow.kernels.cross_entropy import (cross_entropy, cross_entropy_reference, loss_from_stats,
                                            vocab_shard_grad, vocab_shard_stats)

V = 301


def make(dtype, shape=(2, 9), vocab=V):
    logits = (torch.randn(*shape, vocab) * 4).to(dtype)
    labels = torch.randint(0, vocab, shape)
    labels[0, 1] = -100                      # ignored position
    labels[1, 2], labels[1, 3] = 0, vocab - 1  # first and last column
    return logits, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_matches_reference(smoothing, dtype):
    logits, labels = make(dtype)
    dloss = torch.randn(labels.shape)
    rd = ref_dtype(dtype)
    ref = run_grad(lambda x: cross_entropy_reference(x, labels, smoothing), [logits.to(rd)], dloss)
    tri = run_grad(lambda x: cross_entropy(x, labels, smoothing, backend="triton"), [logits], dloss)
    pt = run_grad(lambda x: cross_entropy(x, labels, smoothing, backend="torch"), [logits], dloss)
    assert tri[0].dtype == torch.float32 and tri[0][0, 1] == 0 and (tri[1][0][0, 1] == 0).all()
    check_all(["loss", "dlogits"], [tri[0]] + tri[1], [pt[0]] + pt[1], [ref[0]] + ref[1], dtype)


def test_inplace_backward_reuses_the_logits_buffer():
    logits, labels = make(torch.float32)
    x = logits.clone().requires_grad_()
    h = x * 1.0  # a non-leaf whose storage the backward may overwrite
    loss = cross_entropy(h, labels, backend="triton", inplace_backward=True).sum()
    ptr = h.data_ptr()
    grads = {}
    h.register_hook(lambda g: grads.setdefault("h", g))
    loss.backward()
    assert grads["h"].data_ptr() == ptr
    want = torch.func.grad(lambda t: cross_entropy_reference(t, labels).sum())(logits)
    torch.testing.assert_close(x.grad, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_vocab_shards_combine_to_the_full_loss(backend, smoothing):
    """What the vocab-parallel loss does, with the collectives replaced by stack + max/sum:
    uneven shards, labels in every shard and an ignored row."""
    logits, labels = make(torch.float32)
    dloss = torch.randn(labels.shape)
    bounds = [0, 97, 128, V]
    shards = [logits[..., a:b] for a, b in zip(bounds, bounds[1:])]
    stats = [vocab_shard_stats(s, labels, a, backend=backend) for s, a in zip(shards, bounds)]
    m = torch.stack([st.lse for st in stats]).max(0).values                      # all_reduce MAX
    lse = m + torch.stack([(st.lse - m).exp() for st in stats]).sum(0).log()    # all_reduce SUM
    target = torch.stack([st.target for st in stats]).sum(0)
    sums = torch.stack([st.sum_logits for st in stats]).sum(0)
    loss = loss_from_stats(lse, target, sums, labels, smoothing, V)
    ref_logits = logits.double().requires_grad_()
    ref_loss = cross_entropy_reference(ref_logits, labels, smoothing)
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_logits, dloss.double())
    torch.testing.assert_close(loss.double(), ref_loss, rtol=0, atol=2e-5)
    grads = [vocab_shard_grad(s.clone(), labels, a, lse, dloss, V, smoothing, inplace=True, backend=backend)
             for s, a in zip(shards, bounds)]
    torch.testing.assert_close(torch.cat(grads, -1).double(), ref_grad, rtol=0, atol=1e-6)


def test_expanded_upstream_gradient():
    """loss.mean() sends an expanded (stride-0) gradient back; the kernel reads it by stride."""
    logits, labels = make(torch.float32, shape=(3, 5), vocab=40)
    x = logits.clone().requires_grad_()
    cross_entropy(x, labels, backend="triton").mean().backward()
    want = torch.func.grad(lambda t: cross_entropy_reference(t, labels).mean())(logits)
    torch.testing.assert_close(x.grad, want, rtol=0, atol=1e-6)


def test_torch_backend_refuses_a_second_backward_through_its_consumed_buffer():
    logits, labels = make(torch.float32)
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, labels, backend="torch").sum()
    loss.backward(retain_graph=True)
    want = torch.func.grad(lambda t: cross_entropy_reference(t, labels).sum())(logits)
    torch.testing.assert_close(x.grad, want, rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


# Vocabulary padding: the true vocabulary V = 301 inside a padded row of 384 columns (three interpreter
# chunks, the last one partly real). Padding columns hold large logits, which would dominate the softmax
# if they took part; the loss must equal F.cross_entropy over the first V columns and their gradient
# must be exactly 0.
PADDED = 384


def make_padded(dtype):
    logits, labels = make(dtype, vocab=PADDED)
    labels = labels.clamp(max=V - 1)  # real ids only (the ignored -100 stays)
    logits[..., V:] = 30.0
    return logits, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_padding_columns_take_no_part(smoothing, dtype):
    logits, labels = make_padded(dtype)
    dloss = torch.randn(labels.shape)
    rd = ref_dtype(dtype)
    ref = run_grad(lambda x: cross_entropy_reference(x, labels, smoothing, vocab_size=V), [logits.to(rd)], dloss)
    tri = run_grad(lambda x: cross_entropy(x, labels, smoothing, backend="triton", vocab_size=V), [logits], dloss)
    pt = run_grad(lambda x: cross_entropy(x, labels, smoothing, backend="torch", vocab_size=V), [logits], dloss)
    for out in (tri, pt):
        assert (out[1][0][..., V:] == 0).all()                    # exactly zero, not just small
    check_all(["loss", "dlogits"], [tri[0]] + tri[1], [pt[0]] + pt[1], [ref[0]] + ref[1], dtype)
    unpadded = cross_entropy(logits[..., :V], labels, smoothing, backend="torch")
    torch.testing.assert_close(pt[0], unpadded, rtol=1e-6, atol=0)  # as if there were no padding
    # Negative control: the same logits with the padding taking part give another loss.
    assert (cross_entropy(logits, labels, smoothing, backend="torch") - ref[0].float()).abs().max() > 1


def test_padding_with_inplace_backward():
    logits, labels = make_padded(torch.float32)
    h_in = logits.clone().requires_grad_()
    h = h_in * 1.0
    cross_entropy(h, labels, 0.1, backend="triton", inplace_backward=True, vocab_size=V).sum().backward()
    want = torch.func.grad(lambda t: cross_entropy_reference(t, labels, 0.1, vocab_size=V).sum())(logits)
    torch.testing.assert_close(h_in.grad, want, rtol=0, atol=1e-6)
    assert (h_in.grad[..., V:] == 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_padded_vocab_shards_combine_to_the_unpadded_loss(backend, smoothing):
    """TP=4 over 512 padded columns with V = 301 real ones: shard 2 is partly padding, shard 3 is only
    padding (its lse is -inf and it adds nothing)."""
    logits, labels = make(torch.float32, vocab=512)
    labels = labels.clamp(max=V - 1)
    logits[..., V:] = 30.0
    dloss = torch.randn(labels.shape)
    bounds = [0, 128, 256, 384, 512]
    shards = [logits[..., a:b] for a, b in zip(bounds, bounds[1:])]
    stats = [vocab_shard_stats(s, labels, a, backend=backend, vocab_size=V) for s, a in zip(shards, bounds)]
    assert torch.isneginf(stats[3].lse).all() and (stats[3].sum_logits == 0).all()
    m = torch.stack([st.lse for st in stats]).max(0).values
    lse = m + torch.stack([(st.lse - m).exp() for st in stats]).sum(0).log()
    target = torch.stack([st.target for st in stats]).sum(0)
    sums = torch.stack([st.sum_logits for st in stats]).sum(0)
    loss = loss_from_stats(lse, target, sums, labels, smoothing, V)
    ref_logits = logits.double().requires_grad_()
    ref_loss = cross_entropy_reference(ref_logits, labels, smoothing, vocab_size=V)
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_logits, dloss.double())
    torch.testing.assert_close(loss.double(), ref_loss, rtol=0, atol=2e-5)
    grads = [vocab_shard_grad(s.clone(), labels, a, lse, dloss, V, smoothing, inplace=True, backend=backend)
             for s, a in zip(shards, bounds)]
    grad = torch.cat(grads, -1)
    assert (grad[..., V:] == 0).all()
    torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=1e-6)
