"""MoE in one process: config, router math against plain formulas (Mixtral/Qwen2-MoE/DeepSeek-V3
routing), balancing losses and their gradients through the aux-loss scaler, the capacity drop rule
against a plain loop, the layer against a token-by-token reference, grouped GEMM against a loop,
expert bias update, gradient buffers for expert parameters."""
import math

import pytest
import torch
import torch.nn.functional as F

from megaflow.config import ConfigError, config_from_kwargs, parse_args, parse_layer_freq
from megaflow.kernels.grouped_gemm import grouped_linear, grouped_linear_reference
from megaflow.layers.moe import MoELayer, aux_loss, update_expert_biases
from megaflow.layers.moe.dispatcher import capacity, capacity_keep_mask
from megaflow.layers.moe.router import topk_choice
from megaflow.model.init import initialize_weights
from megaflow.parallel import state

BASE = ["--model-style", "llama", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--num-experts", "4", "--moe-ffn-hidden-size", "24"]


def cfg_of(*extra):
    return parse_args(BASE + list(extra), world_size=1)


def layer_of(*extra, seed=3):
    torch.manual_seed(0)
    layer = MoELayer(cfg_of(*extra), 0, 0.02)
    initialize_weights(layer, seed)
    return layer


# -- config ------------------------------------------------------------------------------------
def test_layer_freq_int_and_patterns():
    assert parse_layer_freq("1", 4) == [1, 1, 1, 1]
    assert parse_layer_freq("2", 5) == [1, 0, 1, 0, 1]
    assert parse_layer_freq("([0]*1+[1]*3)", 4) == [0, 1, 1, 1]
    assert parse_layer_freq("[0,1,0,1]", 4) == [0, 1, 0, 1]
    for bad, msg in [("([0]*2+[1]*3)", "has 5 entries"), ("[0,2,1,1]", "only 0 and 1"),
                     ("__import__('os')", "expected an integer"), ("0", "at least 1")]:
        with pytest.raises(ConfigError, match=msg):
            parse_layer_freq(bad, 4)


@pytest.mark.parametrize("flags, world, msg", [
    (["--moe-router-topk", "5"], 1, "--moe-router-topk"),
    (["--expert-model-parallel-size", "3"], 3, "divisible by --expert-model-parallel-size"),
    (["--tensor-model-parallel-size", "2"], 2, "need --sequence-parallel"),
    (["--moe-router-num-groups", "3", "--moe-router-group-topk", "1"], 1, "must divide --num-experts"),
    (["--moe-pad-expert-input-to-capacity"], 1, "needs --moe-expert-capacity-factor"),
    (["--moe-shared-expert-gate"], 1, "needs --moe-shared-expert-intermediate-size"),
])
def test_config_errors_name_the_flag(flags, world, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_args(BASE + flags, world_size=world)


def test_ep_without_experts_is_refused():
    with pytest.raises(ConfigError, match="needs --num-experts"):
        parse_args(["--expert-model-parallel-size", "2"], world_size=2)


def test_moe_layers_follow_the_frequency():
    from megaflow.model.gpt import GPTModel
    cfg = parse_args(BASE + ["--num-layers", "4", "--moe-layer-freq", "([0]*1+[1]*3)", "--vocab-size", "60"])
    cfg.vocab_size, cfg.padded_vocab_size = 60, 128
    model = GPTModel(cfg)
    assert [type(layer.mlp).__name__ for layer in model.layers] == ["MLP", "MoELayer", "MoELayer", "MoELayer"]
    assert cfg.moe.moe_ffn_hidden_size == 24


# -- router ------------------------------------------------------------------------------------
def test_softmax_router_equals_mixtral_routing_and_qwen2_without_renormalisation():
    x = torch.randn(10, 32)
    for pre_softmax in (False, True):
        layer = layer_of(*(["--moe-router-pre-softmax"] if pre_softmax else []))
        r = layer.router(x, 2)
        probs = F.softmax(x @ layer.router.weight.t(), dim=-1)
        w, idx = probs.topk(2, dim=-1)
        if not pre_softmax:                                  # Mixtral: renormalised over the top k
            w = w / w.sum(-1, keepdim=True)
        assert torch.equal(r.experts_tk, idx)
        torch.testing.assert_close(r.probs_tk, w)


def test_sigmoid_router_with_bias_scaling_and_groups():
    layer = layer_of("--num-experts", "8", "--moe-router-score-function", "sigmoid",
                     "--moe-router-enable-expert-bias", "--moe-router-num-groups", "4",
                     "--moe-router-group-topk", "2", "--moe-router-topk-scaling-factor", "2.5")
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.linspace(-0.3, 0.3, 8))
    x = torch.randn(12, 32)
    r = layer.router(x, 3)
    scores = torch.sigmoid(x @ layer.router.weight.t())
    biased = scores + layer.router.expert_bias
    for t in range(12):                                      # DeepSeek-V3's rule, token by token
        groups = biased[t].view(4, 2)
        best_groups = groups.max(-1).values.topk(2).indices.tolist()     # top-1 per group (k/group_topk)
        allowed = [g * 2 + j for g in best_groups for j in range(2)]
        chosen = sorted(allowed, key=lambda e: -biased[t, e].item())[:2]
        assert sorted(r.experts_tk[t].tolist()) == sorted(chosen)
        w = scores[t, r.experts_tk[t]]
        torch.testing.assert_close(r.probs_tk[t], 2.5 * w / w.sum())   # weights: unbiased scores


def test_topk_choice_without_groups_is_plain_topk():
    s = torch.randn(7, 6)
    assert torch.equal(topk_choice(s, 3, None, None), s.topk(3, dim=-1).indices)


# -- balancing losses --------------------------------------------------------------------------
def _plain_aux(probs_te, experts_tk, coeff):
    t, e = probs_te.shape
    k = experts_tk.shape[1]
    counts = torch.bincount(experts_tk.reshape(-1), minlength=e).float()
    f = counts / (t * k)                                     # fraction of routed slots
    p = probs_te.mean(0)                                     # mean probability
    return coeff * e * (f * p).sum()                         # Switch Transformer: E · Σ f_e P_e


def test_aux_loss_seq_aux_loss_and_z_loss_values():
    x = torch.randn(16, 32)                                  # s = 8, b = 2 (token i in sequence i % 2)
    layer = layer_of("--moe-aux-loss-coeff", "0.1", "--moe-z-loss-coeff", "0.01")
    r = layer.router(x, 2)
    logits = x @ layer.router.weight.t()
    probs = logits.softmax(-1)
    z = 0.01 * torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(torch.tensor(float(r.aux_value)), _plain_aux(probs, r.experts_tk, 0.1))
    torch.testing.assert_close(torch.tensor(float(r.z_value)), z)
    torch.testing.assert_close(r.aux_loss, _plain_aux(probs, r.experts_tk, 0.1) + z)
    seq = layer_of("--moe-aux-loss-coeff", "0.1", "--moe-router-load-balancing-type", "seq_aux_loss")
    r = seq.router(x, 2)
    probs = (x @ seq.router.weight.t()).softmax(-1)
    per_seq = [_plain_aux(probs[i::2], r.experts_tk[i::2], 0.1) for i in range(2)]
    torch.testing.assert_close(r.aux_loss, sum(per_seq) / 2)


def test_aux_loss_reaches_the_router_through_the_scaler():
    """backward of (out · g) with the scaler set to s gives the router the gradient of
    out · g + s · aux: the aux loss trains as if added to the micro-batch loss."""
    layer = layer_of("--moe-aux-loss-coeff", "0.5", "--moe-z-loss-coeff", "0.1")
    x = torch.randn(8, 2, 32)
    g = torch.randn(8, 2, 32)
    aux_loss.set_scale(0.25)
    try:
        (layer(x) * g).sum().backward()
        with_scaler = layer.router.weight.grad.clone()
        layer.zero_grad()
        r = layer.router(x.reshape(16, 32), 2)
        y = layer.dispatcher(x.reshape(16, 32), r.probs_tk, r.experts_tk, layer.experts)
        ((y.view(8, 2, 32) * g).sum() + 0.25 * r.aux_loss).backward()
        torch.testing.assert_close(with_scaler, layer.router.weight.grad)
    finally:
        aux_loss.set_scale(1.0)


# -- dispatch ----------------------------------------------------------------------------------
def _plain_keep(probs, experts, num_experts, cap, policy):
    keep = torch.zeros_like(experts, dtype=torch.bool)
    for e in range(num_experts):
        slots = [(t, j) for t in range(experts.shape[0]) for j in range(experts.shape[1]) if experts[t, j] == e]
        if policy == "probs":
            slots.sort(key=lambda tj: -probs[tj].item())     # stable: ties keep token order
        for t, j in slots[:cap]:
            keep[t, j] = True
    return keep


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_capacity_drop_rule_equals_a_plain_loop(policy):
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(20, 2, generator=g)
    experts = torch.stack([torch.randperm(5, generator=g)[:2] for _ in range(20)])
    cap = capacity(20, 2, 5, 0.8)
    assert cap == math.ceil(20 * 2 / 5 * 0.8)
    keep = capacity_keep_mask(probs, experts, 5, cap, policy)
    assert torch.equal(keep, _plain_keep(probs, experts, 5, cap, policy))
    assert 0 < (~keep).sum() and torch.bincount(experts[keep], minlength=5).max() <= cap


def _token_by_token(layer, x_th, keep=None):
    """y_t = Σ_{kept chosen e} p_e · expert_e(x_t), computed one token at a time."""
    r = layer.router(x_th, 1)
    out = torch.zeros_like(x_th)
    for t in range(x_th.shape[0]):
        for j in range(r.experts_tk.shape[1]):
            if keep is not None and not keep[t, j]:
                continue
            ex = layer.experts.local_experts[str(int(r.experts_tk[t, j]))]
            h = x_th[t] @ ex.linear_fc1.weight.t()
            gate, up = h.chunk(2)
            out[t] += r.probs_tk[t, j] * ((F.silu(gate) * up) @ ex.linear_fc2.weight.t())
    return out, r


@pytest.mark.parametrize("flags", [[], ["--moe-grouped-gemm"], ["--moe-token-dispatcher-type", "allgather"]])
def test_dropless_layer_equals_token_by_token_reference(flags):
    layer = layer_of(*flags)
    x = torch.randn(12, 1, 32)
    ref, _ = _token_by_token(layer, x.view(12, 32))
    torch.testing.assert_close(layer(x).view(12, 32), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pad", [False, True])
def test_capacity_layer_drops_by_the_rule_and_padding_changes_nothing(pad):
    flags = ["--moe-expert-capacity-factor", "0.5"] + (["--moe-pad-expert-input-to-capacity"] if pad else [])
    layer = layer_of(*flags)
    x = torch.randn(12, 1, 32)
    r = layer.router(x.view(12, 32), 1)
    keep = capacity_keep_mask(r.probs_tk, r.experts_tk, 4, capacity(12, 2, 4, 0.5), "probs")
    ref, _ = _token_by_token(layer, x.view(12, 32), keep)
    torch.testing.assert_close(layer(x).view(12, 32), ref, rtol=1e-5, atol=1e-6)
    assert layer.dispatcher.last_dropped == int((~keep).sum()) > 0


def test_shared_expert_with_gate_adds_sigmoid_gated_mlp():
    layer = layer_of("--moe-shared-expert-intermediate-size", "16", "--moe-shared-expert-gate")
    x = torch.randn(6, 1, 32)
    routed, _ = _token_by_token(layer, x.view(6, 32))
    sh = layer.shared_experts
    h = x @ sh.linear_fc1.weight.t()
    gate, up = h.chunk(2, dim=-1)
    shared = ((F.silu(gate) * up) @ sh.linear_fc2.weight.t()) * torch.sigmoid(x @ sh.gate_weight.t())
    torch.testing.assert_close(layer(x), routed.view(6, 1, 32) + shared, rtol=1e-5, atol=1e-6)


# -- grouped GEMM ------------------------------------------------------------------------------
@pytest.mark.parametrize("k, n", [(32, 24), (6, 5)])   # _grouped_mm's aligned shapes, and the loop
def test_grouped_linear_equals_the_loop_forward_and_backward(k, n):
    counts = [3, 0, 7, 2]
    x = torch.randn(12, k, dtype=torch.float64).float().requires_grad_()
    w = torch.randn(4, n, k).requires_grad_()
    dy = torch.randn(12, n)
    y = grouped_linear(x, w, counts, "torch")
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    y_ref = grouped_linear_reference(x, w, counts)
    rx, rw = torch.autograd.grad(y_ref, (x, w), dy)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)
    assert gw[1].abs().sum() == 0                          # an expert without tokens gets no gradient


def test_grouped_gemm_layer_trains_like_the_loop():
    x = torch.randn(10, 2, 32)
    grads = []
    for flags in ([], ["--moe-grouped-gemm"]):
        layer = layer_of(*flags)
        layer(x).square().sum().backward()
        grads.append({n: p.grad for n, p in layer.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6, msg=n)


# -- expert bias, statistics, optimizer buffers ---------------------------------------------------
def test_expert_bias_moves_toward_equal_loads_and_counts_once_per_forward():
    layer = layer_of("--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "0.01",
                     "--moe-router-score-function", "sigmoid")
    layer.train()
    x = torch.randn(16, 1, 32)
    with torch.no_grad():
        layer.router.weight[0] += 0.5                     # expert 0 over-loaded
    layer(x)
    loads = layer.step_counts.clone()
    assert loads.sum() == 16 * 2
    update_expert_biases(layer)
    expected = 0.01 * torch.sign(loads.mean() - loads)
    torch.testing.assert_close(layer.router.expert_bias, expected.float())
    assert layer.step_counts.sum() == 0


def test_expert_parameters_get_their_own_gradient_buffer():
    from megaflow.optim.grad_buffer import GradSync
    from megaflow.model.gpt import GPTModel
    cfg = config_from_kwargs(model_style="llama", num_layers=2, hidden_size=32, num_attention_heads=4,
                             seq_length=16, num_experts=4, moe_ffn_hidden_size=24)
    cfg.vocab_size, cfg.padded_vocab_size = 60, 128
    model = GPTModel(cfg)
    sync = GradSync([model])
    kinds = [{getattr(p, "expert_parallel", False) for p in buf.params} for buf in sync.buffers]
    assert kinds == [{False}, {True}] and sum(len(b.params) for b in sync.buffers) == \
        sum(1 for p in model.parameters() if p.requires_grad)
    assert state.get().edp_size == sync.buffers[1].dp_size == 1
