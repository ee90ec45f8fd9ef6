"""--gradient-accumulation-fusion and --compile against the plain eager run (same seed, same data).

Compile tests are few and tiny: one inductor compile of a 2-layer model (tens of seconds), the rest
dynamo tracing only (torch._dynamo.explain counts the graphs and graph breaks of a block)."""
import pytest
import torch

from megaflow.config import ConfigError, config_from_kwargs, set_vocab_size
from megaflow.model import build_model
from megaflow.model.compile import compile_blocks, compile_seconds
from megaflow.optim.optimizer import build_optimizer
from megaflow.parallel import state
from megaflow.training.step import train_step

VOCAB, SEQ, MBS = 100, 16, 2


@pytest.fixture(autouse=True)
def single_process():
    saved = state._STATE
    state.initialize(1, 1, backend="gloo", device="cpu")
    yield
    state._STATE = saved


def tiny(style="llama", **kw):
    args = dict(model_style=style, num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=SEQ,
                micro_batch_size=MBS, hidden_dropout=0.0, attention_dropout=0.0, lr=1e-2, seed=5,
                attention_backend="torch", norm_backend="torch")
    args.update(kw)
    cfg = config_from_kwargs(**args)
    set_vocab_size(cfg, VOCAB)
    return cfg


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=g)
        out.append({"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(MBS, SEQ),
                    "position_ids": torch.arange(SEQ).expand(MBS, SEQ)})
    return out


def train(cfg, steps=2, microbatches=2):
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    data = iter(batches(steps * microbatches))
    losses = [train_step(cfg, model, opt, None, data, microbatches).loss for _ in range(steps)]
    return model, opt, losses


@pytest.mark.parametrize("style", ["llama", "gpt2"])   # gpt2: tied embeddings, biases, one fc1 block
def test_gradient_accumulation_fusion_matches_the_unfused_run(style):
    ref_model, ref_opt, ref_losses = train(tiny(style))
    model, opt, losses = train(tiny(style, gradient_accumulation_fusion=True))
    fused = [n for n, p in model.named_parameters() if getattr(p, "accumulate_into_main_grad", False)]
    # Every linear weight is fused (4 per layer, + an untied output layer); never the embedding table,
    # which a tied output layer shares with the lookup.
    assert len(fused) == 4 * 2 + (1 if style == "llama" else 0)
    assert not any("embedding" in n for n in fused)
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    for (name, p), ref in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.main_grad, ref.main_grad, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(p.detach(), ref.detach(), rtol=1e-5, atol=1e-7, msg=name)
    # The bookkeeping ran: every bucket heard once from every parameter in every micro-batch (autograd
    # runs a weight's post-accumulate hook even when backward returned no gradient for it).
    assert all(b.pending == 0 for buf in opt.sync.buffers for b in buf.buckets)


@pytest.mark.parametrize("style", ["llama", "gpt2"])   # SwiGLU experts (gate and up blocks) and GeLU ones
def test_gradient_accumulation_fusion_of_grouped_experts(style):
    moe = dict(num_experts=4, moe_ffn_hidden_size=24, moe_router_topk=2, moe_grouped_gemm=True)
    ref_model, _ref_opt, ref_losses = train(tiny(style, **moe))
    model, opt, losses = train(tiny(style, gradient_accumulation_fusion=True, **moe))
    fused = [n for n, p in model.named_parameters() if getattr(p, "accumulate_into_main_grad", False)]
    assert sum(".local_experts." in n for n in fused) == 2 * 4 * 2   # fc1 and fc2 of 4 experts, 2 layers
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    for (name, p), ref in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.main_grad, ref.main_grad, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(p.detach(), ref.detach(), rtol=1e-5, atol=1e-7, msg=name)
    assert all(b.pending == 0 for buf in opt.sync.buffers for b in buf.buckets)


def test_gradient_accumulation_fusion_under_bf16_autocast():
    moe = dict(num_experts=4, moe_ffn_hidden_size=24, moe_router_topk=2, moe_grouped_gemm=True)
    for kw in (dict(), moe):
        _m, _o, ref = train(tiny(bf16=True, **kw), steps=1)
        _m, _o, fused = train(tiny(bf16=True, gradient_accumulation_fusion=True, **kw), steps=1)
        assert fused == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("kw", [dict(), dict(model_style="gpt2"), dict(recompute_granularity="selective")])
def test_a_compiled_block_has_no_graph_break(kw):
    cfg = tiny(**kw)
    model = build_model(cfg)
    x_sbh = torch.randn(SEQ, MBS, 32, requires_grad=True)
    explained = torch._dynamo.explain(model.layers[0])(x_sbh)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def test_compiled_training_matches_eager_and_reports_compile_time():
    """Full recompute around compiled blocks, two micro-batches, two AdamW steps."""
    kw = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    _m, _o, eager = train(tiny(**kw))
    from torch._dynamo.utils import counters
    counters.clear()
    before = compile_seconds()
    model, _o, compiled = train(tiny(compile=True, **kw))
    assert compiled == pytest.approx(eager, rel=1e-5)
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] >= 1
    assert compile_seconds() > before
    # Compiled in place: the parameter names (and so checkpoints) are unchanged.
    assert all("_orig_mod" not in n for n, _ in model.named_parameters())


def test_compile_refuses_the_triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg = tiny(attention_backend="triton")
    model = build_model(cfg)
    with pytest.raises(ConfigError, match="--compile with .*triton needs a GPU"):
        compile_blocks(model, cfg)


def test_compiled_moe_blocks_run_their_routing_eagerly():
    """--compile with grouped experts: routing, dispatch and experts (the routing sets their shapes)
    run eagerly between the block's compiled graphs; torch._grouped_mm's fake-tensor check (bf16
    only) would otherwise fail the trace of an fp32 model. Losses equal the eager run's."""
    moe = dict(num_experts=4, moe_ffn_hidden_size=24, moe_router_topk=2, moe_grouped_gemm=True)
    _m, _o, eager = train(tiny(**moe), steps=1)
    from torch._dynamo.utils import counters
    counters.clear()
    _m, _o, compiled = train(tiny(compile=True, **moe), steps=1)
    assert compiled == pytest.approx(eager, rel=1e-5)
    assert counters["stats"]["unique_graphs"] >= 1
    assert any("MoELayer._routed" in reason for reason in counters["graph_break"])
