"""Single-process checks of the TP RNG tracker, recompute replay, checkpointed RNG state, and that the
tensor-parallel layers cost nothing at TP=1."""
import contextlib
import io

import pytest
import torch
import torch.nn.functional as F

from megaflow.checkpoint.rng import get_rng_state, set_rng_state
from megaflow.config import ConfigError, config_from_kwargs
from megaflow.layers import ColumnParallelLinear, RowParallelLinear, vocab_parallel_cross_entropy
from megaflow.model import build_model, global_named_parameters
from megaflow.parallel import mappings, random, state
from tests.unit.test_model import tiny_cfg


@pytest.fixture(autouse=True)
def single_process_state():
    saved, threads = state._STATE, torch.get_num_threads()
    state._STATE = state.ParallelState(device=torch.device("cpu"))
    torch.set_num_threads(1)  # tiny models: threads only add contention on a shared 2-core machine
    yield
    state._STATE = saved
    torch.set_num_threads(threads)


def test_model_parallel_stream_is_seed_plus_2718_plus_tp_rank():
    state._STATE = state.ParallelState(device=torch.device("cpu"), tp_size=4, tp_rank=3)
    random.model_parallel_seed(10)
    with random.model_parallel_rng():
        drawn = torch.rand(5)
    assert torch.equal(drawn, torch.rand(5, generator=torch.Generator().manual_seed(10 + 2718 + 3)))
    assert torch.equal(torch.rand(5), torch.rand(5, generator=torch.Generator().manual_seed(10)))


def test_fork_does_not_consume_the_default_stream_and_continues_its_own():
    random.model_parallel_seed(5)
    with random.model_parallel_rng():
        a = torch.rand(3)
    default_after = torch.rand(3)
    with random.model_parallel_rng():
        b = torch.rand(3)
        with random.model_parallel_rng():  # nested: keeps drawing, does not replay
            c = torch.rand(3)
    expected = torch.rand(9, generator=torch.Generator().manual_seed(5 + 2718))
    assert torch.equal(torch.cat([a, b, c]), expected)
    assert torch.equal(default_after, torch.rand(3, generator=torch.Generator().manual_seed(5)))


def test_dropout_helper_uses_no_randomness_when_off():
    random.model_parallel_seed(1)
    x = torch.ones(8)
    assert random.dropout(x, 0.0, True) is x and random.dropout(x, 0.5, False, model_parallel=True) is x
    assert torch.equal(torch.rand(2), torch.rand(2, generator=torch.Generator().manual_seed(1)))


def test_rng_checkpoint_includes_tracker_and_loads_with_weights_only():
    random.model_parallel_seed(3)
    torch.rand(4)
    buf = io.BytesIO()
    torch.save(get_rng_state(), buf)
    with random.model_parallel_rng():
        want_tp = torch.rand(4)
    want_default = torch.rand(4)
    random.model_parallel_seed(999)  # scramble both streams
    buf.seek(0)
    set_rng_state(torch.load(buf, weights_only=True))
    with random.model_parallel_rng():
        assert torch.equal(torch.rand(4), want_tp)
    assert torch.equal(torch.rand(4), want_default)


def _loss_and_grads(cfg):
    model = build_model(cfg)
    model.train()
    random.model_parallel_seed(42)
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model(ids, labels_bs=ids).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in global_named_parameters(model)}


@pytest.mark.parametrize("style", ["gpt2", "llama"])
@pytest.mark.parametrize("recompute", [dict(recompute_granularity="full", recompute_method="uniform",
                                            recompute_num_layers=2),
                                       dict(recompute_granularity="full", recompute_method="block",
                                            recompute_num_layers=1),
                                       dict(recompute_granularity="selective")])
def test_recompute_reproduces_dropout_bit_for_bit(style, recompute):
    drop = dict(hidden_dropout=0.2, attention_dropout=0.2)
    base_loss, base = _loss_and_grads(tiny_cfg(style, **drop))
    loss, grads = _loss_and_grads(tiny_cfg(style, **drop, **recompute))
    assert torch.equal(loss, base_loss)
    for name in base:
        assert torch.equal(grads[name], base[name]), name
    no_drop_loss, _ = _loss_and_grads(tiny_cfg(style))
    assert not torch.equal(no_drop_loss, base_loss)  # dropout really was on


def test_tp1_layers_add_no_autograd_nodes_and_no_collectives():
    x = torch.randn(4, 2, 8, requires_grad=True)
    for fn in (mappings.copy_to_tensor_parallel_region, mappings.reduce_from_tensor_parallel_region,
               mappings.scatter_to_tensor_parallel_region, mappings.gather_from_tensor_parallel_region,
               mappings.scatter_to_sequence_parallel_region, mappings.gather_from_sequence_parallel_region,
               mappings.reduce_scatter_to_sequence_parallel_region):
        assert fn(x) is x
    col, row = ColumnParallelLinear(8, 6, sequence_parallel=True), RowParallelLinear(6, 8, sequence_parallel=True)
    torch.nn.init.normal_(col.weight)
    torch.nn.init.normal_(row.weight)
    y = row(col(x))
    assert torch.equal(y, F.linear(F.linear(x, col.weight, col.bias), row.weight, row.bias))
    logits, target = torch.randn(5, 11), torch.randint(0, 11, (5,))
    assert torch.equal(vocab_parallel_cross_entropy(logits, target, label_smoothing=0.1),
                       F.cross_entropy(logits, target, reduction="none", label_smoothing=0.1))


def test_sequence_parallel_needs_divisible_sequence():
    with pytest.raises(ConfigError, match="--sequence-parallel"):
        config_from_kwargs(world_size=4, tensor_model_parallel_size=4, sequence_parallel=True, seq_length=18,
                           num_attention_heads=4)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_separate_blocks_equal_the_fused_layer_split(bias, autocast):
    """Q/K/V (or gate/up) from one matmul per block equal the fused output split, gradients included
    (each block's weight gradient written into its rows, the input gradient summed over blocks)."""
    sizes = [12, 4, 4]
    fused = ColumnParallelLinear(8, sum(sizes), bias=bias, fused_sizes=sizes)
    blocks = ColumnParallelLinear(8, sum(sizes), bias=bias, fused_sizes=sizes, separate_blocks=True)
    torch.nn.init.normal_(fused.weight)
    if bias:
        torch.nn.init.normal_(fused.bias)
    blocks.load_state_dict(fused.state_dict())
    x = torch.randn(5, 3, 8)
    upstream = [torch.randn(5, 3, n) for n in sizes]
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext

    def run(layer, split):
        x_in = x.clone().requires_grad_()
        with ctx():
            outs = split(layer(x_in))
        grads = torch.autograd.grad(outs, [x_in] + list(layer.parameters()),
                                    [g.to(o.dtype) for o, g in zip(outs, upstream)])
        return outs, grads

    got, got_grads = run(blocks, tuple)
    want, want_grads = run(fused, lambda y: y.split(sizes, dim=-1))
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.is_contiguous()
        torch.testing.assert_close(a, b, **tol)
    assert len(got_grads) == len(want_grads) == (3 if bias else 2)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a.float(), b.float(), **tol)


def test_separate_blocks_need_fused_sizes():
    with pytest.raises(ValueError, match="separate_blocks needs fused_sizes"):
        ColumnParallelLinear(8, 6, separate_blocks=True)
