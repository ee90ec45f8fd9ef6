"""Muon in one process: megaflow's optimizer over gradient buffers equals torch.optim.Muon on the layers'
2-D weights plus torch.optim.AdamW on the rest; the Newton-Schulz result is close to orthogonal; Q, K
and V are orthogonalised separately by default; whole matrices are spread over DP ranks by size."""
import copy

import pytest
import torch

from megaflow.optim.muon import assign_owners, is_muon_param, newton_schulz, scale_factor
from megaflow.optim.optimizer import build_optimizer
from megaflow.model import build_model
from tests.unit.test_distrib_optimizer import fake_dp, tiny_cfg  # noqa: F401  (fixture)

TORCH_LIKE = dict(optimizer="muon", muon_momentum=0.95, muon_use_nesterov=True, muon_scale_mode="shape_scaling",
                  muon_split_qkv=False, muon_fp32_matmul_prec="medium", muon_num_ns_steps=5)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_muon_equals_torch_muon_plus_adamw(fake_dp, style):  # noqa: F811
    cfg = tiny_cfg(style, clip_grad=0.0, **TORCH_LIKE)
    fake_dp(0, 1)
    reference = build_model(cfg)
    named = list(reference.named_parameters())
    muon = [p for n, p in named if is_muon_param(n, p)]
    assert len(muon) == 4 * 2 and all(".weight" in n and "layers." in n for n, p in named if is_muon_param(n, p))
    ref_muon = torch.optim.Muon(muon, lr=1e-2, weight_decay=0.1, momentum=0.95, nesterov=True)
    ref_adamw = torch.optim.AdamW([
        {"params": [p for n, p in named if not is_muon_param(n, p) and p.ndim > 1], "weight_decay": 0.1},
        {"params": [p for n, p in named if p.ndim == 1], "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.999),
        eps=1e-8)
    model = copy.deepcopy(reference)
    opt = build_optimizer(cfg, model)
    assert type(opt.optimizer).__name__ == "MuonWithAdamW"
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        grads = {n: torch.randn(p.shape, generator=gen) for n, p in named}
        for n, p in named:
            p.grad = grads[n].clone()
        ref_muon.step()
        ref_adamw.step()
        for n, p in model.named_parameters():
            p.main_grad.copy_(grads[n])
        opt.step()
        for (n, p), (_, q) in zip(named, model.named_parameters()):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=n)
    states = {pc.name: s for pc, s in opt.piece_states()}
    qkv = "layers.0.self_attention.linear_qkv.weight"
    assert set(states[qkv]) == {"momentum_buffer", "step"} and states[qkv]["step"].item() == 4
    torch.testing.assert_close(states[qkv]["momentum_buffer"].view(-1),
                               ref_muon.state[dict(named)[qkv]]["momentum_buffer"].view(-1))
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(states["word_embeddings.weight"])
    assert opt.memory_bytes()["optimizer_state"] == opt.measured_state_bytes()   # exact once state exists


def test_newton_schulz_orthogonalises_and_scales():
    g = torch.randn(48, 16, generator=torch.Generator().manual_seed(1))
    o = newton_schulz(g, 5, torch.float32)
    s = torch.linalg.svdvals(o)
    assert o.shape == g.shape and s.min() > 0.6 and s.max() < 1.25        # singular values pushed to ~1
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    assert torch.nn.functional.cosine_similarity((u @ vh).flatten(), o.flatten(), dim=0) > 0.98
    assert scale_factor(48, 16, "spectral") == pytest.approx(48 ** 0.5)
    assert scale_factor(48, 16, "shape_scaling") == pytest.approx(3 ** 0.5)
    assert scale_factor(16, 48, "shape_scaling") == 1.0
    assert scale_factor(16, 48, "unit_rms_norm") == pytest.approx((16 / 48) ** 0.5)


def test_split_qkv_orthogonalises_each_block(fake_dp):  # noqa: F811
    fake_dp(0, 1)
    cfg = tiny_cfg("llama", clip_grad=0.0, optimizer="muon", muon_fp32_matmul_prec="high", weight_decay=0.0,
                   group_query_attention=True, num_query_groups=2)
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    qkv = model.layers[0].self_attention.linear_qkv.weight
    before = qkv.detach().clone()
    for p in model.parameters():
        p.main_grad.normal_()
    g = qkv.main_grad.clone()
    opt.step()
    # First step, no Nesterov (Megatron's default): the momentum is (1 − μ)·g, NS is scale-invariant.
    blocks = g.split(qkv.fused_sizes, dim=0)
    expected = torch.cat([newton_schulz(b, 5, torch.float32) * scale_factor(*b.shape, "spectral") for b in blocks])
    torch.testing.assert_close(before - qkv.detach(), 1e-2 * expected, rtol=1e-4, atol=1e-6)
    assert len(set(qkv.fused_sizes)) == 2                          # GQA: Q larger than K and V


def test_whole_matrices_are_balanced_over_dp_ranks():
    params = [torch.empty(n) for n in (100, 90, 60, 50, 40, 10)]
    owner = assign_owners(params, 2)
    load = [sum(p.numel() for p in params if owner[p] == r) for r in range(2)]
    # Largest first to the least loaded rank: 100→0, 90→1, 60→1, 50→0 (tie: lower rank), 40→0, 10→1.
    assert load == [190, 160] and owner == assign_owners(params, 2)
    assert sorted(set(assign_owners(params, 4).values())) == [0, 1, 2, 3]
