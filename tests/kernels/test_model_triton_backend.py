"""The model on the Triton kernels (in the interpreter) against the same model on torch ops:
two real training steps through megaflow's trainer, and every parameter gradient of one step;
and Triton attention dropout under the model's RNG streams and selective recompute.

--attention-backend triton routes attention, RoPE and SwiGLU to Triton, --norm-backend triton the
norms. The loss has no backend flag (the model calls cross_entropy with "auto", which is Triton on
CUDA), so for the Triton runs these tests send cross entropy's "auto" to Triton, as a GPU run
would. Dropout is off: the Triton kernels draw different random masks than torch."""
import contextlib
import math

import pytest
import torch

import megaflow.kernels.attention_triton as attention_triton
import megaflow.kernels.cross_entropy as ce_module
import megaflow.kernels.norm_triton as norm_triton
from megaflow.config import config_from_kwargs, parse_args, set_vocab_size
from megaflow.model import build_model, global_named_parameters
from megaflow.parallel import state
from megaflow.parallel.random import model_parallel_seed
from megaflow.training.trainer import pretrain

TINY = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "200", "--num-layers", "2",
        "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "24", "--micro-batch-size", "1",
        "--global-batch-size", "2", "--num-workers", "0", "--log-interval", "1", "--eval-iters", "1",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--lr", "3e-3", "--train-iters", "2",
        "--eval-interval", "2"]
STYLES = {"gpt2": dict(model_style="gpt2"),
          "llama": dict(model_style="llama", group_query_attention=True, num_query_groups=2)}


def style_flags(style):
    flags = []
    for k, v in STYLES[style].items():
        flag = "--" + k.replace("_", "-")
        flags += [flag] if v is True else [flag, str(v)]
    return flags


@contextlib.contextmanager
def kernels(kind, monkeypatch):
    """For kind == "triton": cross entropy's "auto" means Triton, and kernel calls are counted."""
    if kind == "torch":
        yield None
        return
    used = {"attention": 0, "norm": 0, "cross_entropy": 0}

    def counting(module, name, key):
        real = getattr(module, name)

        def wrapper(*a, **kw):
            used[key] += 1
            return real(*a, **kw)
        m.setattr(module, name, wrapper)

    with monkeypatch.context() as m:
        real_resolve = ce_module.resolve_backend
        m.setattr(ce_module, "resolve_backend",
                  lambda b, t, *a: "triton" if b == "auto" else real_resolve(b, t, *a))
        counting(attention_triton, "flash_attn_forward", "attention")
        counting(norm_triton, "norm_forward", "norm")
        import megaflow.kernels.cross_entropy_triton as ce_triton
        counting(ce_triton, "shard_stats", "cross_entropy")
        yield used
    assert all(used.values()), f"a Triton kernel was not used: {used}"


def train(argv):
    try:
        return pretrain(parse_args(argv))
    finally:
        state.destroy()


@pytest.mark.parametrize("style", sorted(STYLES))
def test_two_training_steps_match_torch_backend(style, monkeypatch):
    results = {}
    for kind in ("torch", "triton"):
        with kernels(kind, monkeypatch):
            results[kind] = train(TINY + style_flags(style) + ["--attention-backend", kind, "--norm-backend", kind])
    ref, tri = results["torch"], results["triton"]
    assert sorted(tri.losses) == sorted(ref.losses) == [1, 2]
    for it in (1, 2):  # step 2's loss sees the weights after step 1's update
        assert math.isclose(tri.losses[it], ref.losses[it], rel_tol=2e-5), (it, tri.losses, ref.losses)
    # validation after step 2: the weights after two updates agree
    assert math.isclose(tri.valid_losses[2], ref.valid_losses[2], rel_tol=2e-5), (tri.valid_losses, ref.valid_losses)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_every_parameter_gradient_matches_torch_backend(style, monkeypatch):
    grads = {}
    ids = torch.randint(0, 200, (2, 25), generator=torch.Generator().manual_seed(0))
    for kind in ("torch", "triton"):
        cfg = config_from_kwargs(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=24, vocab_size=200,
                                 hidden_dropout=0.0, attention_dropout=0.0, attention_backend=kind,
                                 norm_backend=kind, **STYLES[style])
        set_vocab_size(cfg, cfg.data.vocab_size)
        try:
            with kernels(kind, monkeypatch):
                model = build_model(cfg)
                model(ids[:, :-1], labels_bs=ids[:, 1:]).mean().backward()
            grads[kind] = {n: p.grad.clone() for n, p in global_named_parameters(model)}
        finally:
            state.destroy()
    assert grads["torch"].keys() == grads["triton"].keys()
    for name, g in grads["torch"].items():
        scale = g.abs().max().item()
        torch.testing.assert_close(grads["triton"][name], g, rtol=0, atol=1e-5 * max(scale, 1e-3), msg=name)


def test_triton_attention_dropout_is_replayed_by_recompute(monkeypatch):
    """Attention dropout on the Triton kernels draws its Philox seed from the (model-parallel) torch
    generator, so selective recompute regenerates the same mask: gradients equal those without
    recompute, and differ from a run without dropout."""
    ids = torch.randint(0, 200, (2, 25), generator=torch.Generator().manual_seed(0))
    grads = {}
    for name, extra in (("plain", {}), ("recompute", dict(recompute_granularity="selective")),
                        ("no-dropout", dict(attention_dropout=0.0))):
        kw = dict(num_layers=1, hidden_size=32, num_attention_heads=2, seq_length=24, vocab_size=200,
                  hidden_dropout=0.0, attention_dropout=0.3, attention_backend="triton", norm_backend="torch",
                  **STYLES["llama"])
        kw.update(extra)
        cfg = config_from_kwargs(**kw)
        set_vocab_size(cfg, cfg.data.vocab_size)
        try:
            model = build_model(cfg)
            model.train()
            model_parallel_seed(5)  # both streams: attention dropout draws from the model-parallel one
            model(ids[:, :-1], labels_bs=ids[:, 1:]).mean().backward()
            grads[name] = {n: p.grad.clone() for n, p in global_named_parameters(model)}
        finally:
            state.destroy()
    for n, g in grads["plain"].items():
        torch.testing.assert_close(grads["recompute"][n], g, rtol=0, atol=0, msg=n)
    qkv = "layers.0.self_attention.linear_qkv.weight"
    assert not torch.allclose(grads["plain"][qkv], grads["no-dropout"][qkv])
