"""The optimizer over gradient buffers in one process: bucketing, AdamW on shards equal to
torch.optim.AdamW on the whole model, bf16 parameters with fp32 main parameters, exact memory
figures, and train_step equal to a plain PyTorch loop."""
import copy

import pytest
import torch

from megaflow.config import config_from_kwargs, set_vocab_size
from megaflow.model import build_model, global_named_parameters
from megaflow.optim.grad_buffer import ALIGN, GradBuffer
from megaflow.optim.grads import clip_gradients
from megaflow.optim.optimizer import build_optimizer
from megaflow.parallel import state
from megaflow.training.step import train_step


def tiny_cfg(style="gpt2", **kw):
    args = dict(model_style=style, num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                vocab_size=100, hidden_dropout=0.0, attention_dropout=0.0, make_vocab_size_divisible_by=8,
                lr=1e-2, weight_decay=0.1, micro_batch_size=2, global_batch_size=4)
    args.update(kw)
    cfg = config_from_kwargs(**args)
    set_vocab_size(cfg, cfg.data.vocab_size)
    return cfg


@pytest.fixture
def fake_dp():
    """Pretend this process is rank r of a DP group of size n (no collectives are called)."""
    def set_rank(rank, size):
        state._STATE = state.ParallelState(dp_size=size, dp_rank=rank, world_size=size, rank=rank)
    yield set_rank
    state._STATE = None


def test_buckets_in_backward_order_padded_shared_embedding_alone(fake_dp):
    fake_dp(0, 3)
    model = build_model(tiny_cfg())
    names = {p: n for n, p in model.named_parameters()}
    model.word_embeddings.weight.shared_embedding = True    # as on a pipeline stage with a tied copy
    buf = GradBuffer(model, bucket_size=3000, dp_size=3)
    order = [names[p] for b in buf.buckets for p in b.params]
    assert order == list(reversed(list(names.values())))            # backward order
    assert [names[p] for p in buf.buckets[-1].params] == ["word_embeddings.weight"]
    assert len(buf.buckets) > 3 and all(b.padded % (3 * ALIGN) == 0 and b.padded - b.numel < 3 * ALIGN
                                        for b in buf.buckets)       # aligned shards, as little tail as that allows
    assert all(lo % ALIGN == 0 for b in buf.buckets for lo, _hi in b.offsets.values())  # aligned starts
    for b in buf.buckets:                                             # params and grads are buffer views
        for p, (lo, hi) in b.offsets.items():
            assert p.data_ptr() == b.param_data[lo:hi].data_ptr()
            assert p.main_grad.data_ptr() == b.grad_data[lo:hi].data_ptr() == p.grad.data_ptr()


@pytest.mark.parametrize("dp", [1, 3])
def test_adamw_on_shards_equals_torch_adamw_on_the_model(fake_dp, dp):
    cfg = tiny_cfg(use_distributed_optimizer=dp > 1, ddp_bucket_size=2000)
    fake_dp(0, 1)
    reference = build_model(cfg)
    ref_opt = torch.optim.AdamW([
        {"params": [p for n, p in reference.named_parameters() if p.ndim > 1], "weight_decay": 0.1},
        {"params": [p for n, p in reference.named_parameters() if p.ndim == 1], "weight_decay": 0.0}],
        lr=1e-2, betas=(0.9, 0.999), eps=1e-8, fused=True)  # as build_optimizer on CPU
    ranks = []
    for r in range(dp):
        fake_dp(r, dp)
        model = copy.deepcopy(reference)
        ranks.append((model, build_optimizer(cfg, model)))
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        grads = {n: torch.randn(p.shape, generator=gen) for n, p in reference.named_parameters()}
        for n, p in reference.named_parameters():
            p.grad = grads[n].clone()
        ref_opt.step()
        full = {}
        for r, (model, opt) in enumerate(ranks):
            for n, p in model.named_parameters():
                p.main_grad.copy_(grads[n])
            opt.optimizer.step()                     # the shard update (no collectives at fake DP)
            owned = {id(pc.param) for pc in opt.pieces}
            for n, p in model.named_parameters():    # assemble each rank's owned elements
                flat = full.setdefault(n, torch.full((p.numel(),), float("nan")))
                for pc in opt.pieces:
                    if pc.param is p:
                        flat[pc.lo:pc.hi] = p.detach().reshape(-1)[pc.lo:pc.hi]
            assert owned
        for n, p in reference.named_parameters():
            torch.testing.assert_close(full[n].view(p.shape), p.detach(), rtol=0, atol=0, msg=n)
    if dp > 1:                                       # shards: each rank holds about 1/dp of the state
        sizes = [sum(pc.hi - pc.lo for pc in opt.pieces) for _, opt in ranks]
        total = sum(p.numel() for p in reference.parameters())
        padding = sum(hi - lo for b in ranks[0][1].sync.buffers[0].buckets for lo, hi in b.padding())
        assert sum(sizes) == total                   # every element owned by exactly one rank
        assert max(sizes) - min(sizes) <= padding    # equal shards of each padded bucket


def test_bf16_params_keep_fp32_main_params():
    cfg = tiny_cfg(bf16=True, low_precision_params=True)
    model = build_model(cfg)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    opt = build_optimizer(cfg, model)
    assert all(pc.main.dtype == torch.float32 and pc.main is not pc.model for pc in opt.pieces)
    for p in model.parameters():                     # a gradient that bf16 could not add exactly
        p.main_grad.fill_(1e-3)
    before = [pc.main.clone() for pc in opt.pieces]
    opt.step()
    for pc, b in zip(opt.pieces, before):
        assert not torch.equal(pc.main, b)
        assert torch.equal(pc.model, pc.main.to(torch.bfloat16))        # model = bf16(main)
    mem = opt.memory_bytes()
    phi = sum(p.numel() for p in model.parameters())
    held = opt.sync.buffers[0].numel                 # Φ and the alignment padding (< ALIGN per parameter)
    assert phi <= held < phi + ALIGN * (len(opt.pieces) + 1)
    assert mem["parameters"] == 2 * held and mem["gradients"] == 4 * held
    assert mem["main_params"] == 4 * phi and mem["optimizer_state"] == opt.measured_state_bytes()
    assert mem["optimizer"] == 4 * phi + 8 * phi + 4 * len(opt.pieces)  # 12 Φ + one step scalar each


def test_bf16_gradients_accumulate_in_fp32():
    cfg = tiny_cfg(bf16=True, low_precision_params=True)
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    opt.start_step(2)
    w = model.layers[0].mlp.linear_fc2.weight
    for scale in (1.0, 1e-3):                        # bf16 would round 1 + 0.001 back to 1
        (w.float().sum() * scale).backward()
    small = torch.tensor(1e-3).to(torch.bfloat16).float()      # each backward's grad is bf16
    assert w.grad is None and torch.equal(w.main_grad, torch.full_like(w.main_grad, 1.0) + small)


def test_parameter_used_twice_per_microbatch_is_an_error():
    cfg = tiny_cfg(overlap_grad_reduce=True, ddp_bucket_size=1)    # one bucket per parameter
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    opt.start_step(1)
    w = model.final_norm.bias                        # the last parameter: the first bucket
    w.sum().backward()
    with pytest.raises(RuntimeError, match="after its bucket was reduced"):
        w.sum().backward()


def _batches(cfg, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, b, v = cfg.data.seq_length, cfg.training.micro_batch_size, cfg.vocab_size
    for _ in range(n):
        tokens = torch.randint(0, v, (b, s + 1), generator=g)
        yield {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(b, s),
               "position_ids": torch.arange(s).expand(b, s)}


ZERO_STAGES = {"plain": {}, "zero2": dict(use_distributed_optimizer=True, zero_stage=2, ddp_bucket_size=2000),
               "zero3": dict(use_distributed_optimizer=True, zero_stage=3),
               "zero3_recompute": dict(use_distributed_optimizer=True, zero_stage=3, recompute_granularity="full",
                                       recompute_method="uniform", recompute_num_layers=2)}


@pytest.mark.parametrize("style, zero", [("gpt2", "plain"), ("llama", "plain"), ("gpt2", "zero2"),
                                         ("gpt2", "zero3"), ("llama", "zero3_recompute")])
def test_train_step_equals_a_plain_pytorch_loop(style, zero):
    """The buffers, hooks and pieces change nothing about the math: same weights as model.grad +
    torch.optim.AdamW (2 micro-batches per step, tied embeddings for gpt2), the global norm equal to
    clip_grad_norm_'s. Both sides clip with the same coefficient (megaflow's): GPT-2's key bias has a
    gradient that is zero up to round-off, which Adam scales up to lr-sized steps, so a one-ulp
    difference in how the coefficient rounds would flip their sign."""
    cfg = tiny_cfg(style, clip_grad=0.5, **ZERO_STAGES[zero])
    model = build_model(cfg)
    reference = copy.deepcopy(model)
    opt = build_optimizer(cfg, model)  # ZeRO-2/3 at DP = 1: the kept shards are whole, no collectives
    ref_opt = torch.optim.AdamW([
        {"params": [p for n, p in reference.named_parameters() if p.ndim > 1], "weight_decay": 0.1},
        {"params": [p for n, p in reference.named_parameters() if p.ndim == 1], "weight_decay": 0.0}],
        lr=1e-2, fused=True)                          # as build_optimizer on CPU
    data = list(_batches(cfg, 6))
    for step in range(3):
        result = train_step(cfg, model, opt, None, iter(data[2 * step:2 * step + 2]), 2)
        ref_opt.zero_grad()
        for batch in data[2 * step:2 * step + 2]:
            loss_bs = reference(batch["tokens"], batch["position_ids"], labels_bs=batch["labels"])
            (loss_bs.float().mean() / 2).backward()
        norm = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()])
        assert result.grad_norm == pytest.approx(norm.item(), rel=1e-5)
        clip_gradients(list(reference.parameters()), 0.5, result.grad_norm)
        ref_opt.step()
    ref = dict(global_named_parameters(reference))
    with opt.gathered_parameters():  # ZeRO-3 holds shards between forwards
        for name, p in global_named_parameters(model):
            torch.testing.assert_close(p, ref[name], rtol=1e-5, atol=1e-6, msg=name)
    if zero.startswith("zero3"):
        assert all(p.untyped_storage().nbytes() == 0 for p in model.parameters())  # freed again


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_every_module_with_parameters_runs_its_forward_hooks(style):
    """--overlap-param-gather waits for a module's parameters in its forward pre-hook: a module whose
    forward is called directly (module.forward(x), not module(x)) would read them mid-gather."""
    model = build_model(tiny_cfg(style))
    owners = {m for m in model.modules() if any(True for _ in m.parameters(recurse=False))}
    fired = set()
    for m in owners:
        m.register_forward_pre_hook(lambda mod, _args: fired.add(mod))
    batch = next(_batches(tiny_cfg(style), 1))
    model(batch["tokens"], batch["position_ids"], labels_bs=batch["labels"])
    assert {type(m).__name__ for m in owners - fired} == set()


def test_fp16_params_with_loss_scaling_skip_then_train():
    from megaflow.optim.loss_scaler import DynamicLossScaler
    cfg = tiny_cfg(fp16=True, low_precision_params=True)
    model = build_model(cfg)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    opt = build_optimizer(cfg, model)
    scaler = DynamicLossScaler(initial_scale=2.0 ** 20, hysteresis=1)
    data = list(_batches(cfg, 8))
    results = [train_step(cfg, model, opt, scaler, iter(data[2 * i:2 * i + 2]), 2) for i in range(4)]
    assert [r.skipped for r in results] == [True, True, False, False]  # 2^20, 2^19 overflow fp16
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(pc.main).all() and pc.main.dtype == torch.float32 for pc in opt.pieces)
