"""Issue 17's proof: Mixture-of-Experts models train at every expert-parallel layout exactly like one
process with the same weights and data — losses, every step's gradient norm, final weights (fp32):
EP=2 and EP=4, TP2×EP2 with sequence parallelism (experts whole, ETP=1, or split like the MLP,
ETP=2), PP2×EP2×DP with ZeRO, and a second model (sigmoid router with expert bias and group-limited
routing, sequence aux loss, a gated shared expert, a leading dense layer, capacity with padding,
grouped GEMM, the all-gather dispatcher) at EP4 and at TP2×PP2×EP2 with ZeRO, and DeepSeek-V3's
shape (multi-latent attention with YaRN, a dense first layer, sigmoid group-limited routing with expert
bias, scaled weights and a shared expert, multi-token prediction) at TP2×PP2×EP2 with ZeRO; ZeRO stages 2 and 3
shard the experts over expert-DP (EP2 at stage 2, PP2×EP2 and TP2×PP2×EP2 at stage 3). A checkpoint
saved at EP=2 with ZeRO-3 continues at EP=4 (no ZeRO), at TP2×PP2×EP2 (ZeRO-1) and in one process,
equal to the uninterrupted run.

One 8-process torchrun launch (every configuration in turn) plus the single-process runs here."""
import contextlib
import io
import json
import math
import os

import pytest
import torch

from megaflow.checkpoint.format import CheckpointReader
from megaflow.parallel import state
from tests.distributed.runs import DEEPSEEK_MLA, LLAMA, run
from tests.launch import torchrun

HERE = os.path.dirname(__file__)
BATCH = ["--global-batch-size", "16"]  # 8 micro-batches of 2: DP 8 gets one each
MOE_A = LLAMA + BATCH + ["--num-experts", "4", "--moe-ffn-hidden-size", "48", "--moe-router-topk", "2",
                         "--moe-aux-loss-coeff", "0.01", "--moe-z-loss-coeff", "0.001"]
MOE_B = LLAMA + BATCH + ["--num-experts", "8", "--moe-ffn-hidden-size", "32", "--moe-router-topk", "2",
                         "--moe-layer-freq", "([0]*1+[1]*3)", "--moe-router-score-function", "sigmoid",
                         "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "0.01",
                         "--moe-router-num-groups", "4", "--moe-router-group-topk", "2",
                         "--moe-router-topk-scaling-factor", "2.0",
                         "--moe-router-load-balancing-type", "seq_aux_loss", "--moe-aux-loss-coeff", "0.01",
                         "--moe-shared-expert-intermediate-size", "32", "--moe-shared-expert-gate",
                         "--moe-expert-capacity-factor", "1.0", "--moe-token-drop-policy", "position",
                         "--moe-pad-expert-input-to-capacity", "--moe-grouped-gemm",
                         "--moe-token-dispatcher-type", "allgather"]
# DeepSeek-V3's shape: multi-latent attention, a leading dense layer, then its routing and shared expert,
# and a multi-token-prediction module (an MoE layer too) on the last stage.
DEEPSEEK = DEEPSEEK_MLA + BATCH + ["--num-experts", "8", "--moe-ffn-hidden-size", "32", "--moe-router-topk", "4",
                                   "--moe-layer-freq", "([0]*1+[1]*3)", "--moe-router-score-function", "sigmoid",
                                   "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "0.01",
                                   "--moe-router-num-groups", "4", "--moe-router-group-topk", "2",
                                   "--moe-router-topk-scaling-factor", "2.5", "--moe-aux-loss-coeff", "0.001",
                                   "--moe-shared-expert-intermediate-size", "64", "--mtp-num-layers", "1"]
EP = lambda n: ["--expert-model-parallel-size", str(n)]  # noqa: E731
TP2_SP = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
PP2 = ["--pipeline-model-parallel-size", "2"]
ZERO = ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather", "--ddp-bucket-size", "4000"]
Z = lambda stage: ZERO + ["--zero-stage", str(stage)]  # noqa: E731  (experts sharded over expert-DP)

PARITY = {
    "ep2": MOE_A + EP(2),
    "ep4": MOE_A + EP(4),
    "tp2_ep2_etp1_sp": MOE_A + TP2_SP + EP(2) + ["--expert-tensor-parallel-size", "1"],
    "tp2_ep2_etp2_sp": MOE_A + TP2_SP + EP(2),
    "pp2_ep2_zero": MOE_A + PP2 + EP(2) + ZERO,
    "b_ep4": MOE_B + EP(4),
    "b_tp2_pp2_ep2_zero": MOE_B + TP2_SP + PP2 + EP(2) + ZERO,
    "ep2_zero2": MOE_A + EP(2) + Z(2),
    "pp2_ep2_zero3": MOE_A + PP2 + EP(2) + Z(3),
    "b_tp2_pp2_ep2_zero3": MOE_B + TP2_SP + PP2 + EP(2) + Z(3),
    "ds_tp2_pp2_ep2_zero": DEEPSEEK + TP2_SP + PP2 + EP(2) + ZERO,
}
RESUMED = ["resume_ep4", "resume_tp2_pp2_ep2", "resume_ep1"]


def in_process(args):
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            result = run(args)
    finally:
        state.destroy()
    return result, buf.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moe_layouts")
    ck = str(tmp / "ckpt_ep2")
    configs = dict(PARITY)
    configs["save_ep2"] = MOE_A + EP(2) + Z(3) + ["--save", ck, "--save-interval", "100", "--exit-interval", "2"]
    configs["resume_ep4"] = MOE_A + EP(4) + ["--load", ck]
    configs["resume_tp2_pp2_ep2"] = MOE_A + TP2_SP + PP2 + EP(2) + ZERO + ["--load", ck]
    (tmp / "configs.json").write_text(json.dumps(configs))
    proc = torchrun(os.path.join(HERE, "layout_worker.py"), 8, [tmp, tmp / "configs.json"], timeout=900)
    out = {n: [torch.load(tmp / f"{n}.rank{r}.pt", weights_only=False) for r in range(8)] for n in configs}
    out["resume_ep1"] = [in_process(MOE_A + ["--load", ck])[0]]
    refs = {"a": in_process(MOE_A)[0], "b": in_process(MOE_B)[0], "ds": in_process(DEEPSEEK)[0]}
    return out, refs, ck, proc.stdout


def _assert_same_training(ranks, ref, iterations):
    assert ref["losses"][4] < ref["losses"][1] - 0.05                 # it trained: weights moved
    last = ranks[-1]
    assert sorted(last["losses"]) == iterations
    for it in iterations:
        assert last["losses"][it] == pytest.approx(ref["losses"][it], rel=1e-5, abs=1e-6), it
    assert last["valid_losses"][4] == pytest.approx(ref["valid_losses"][4], rel=1e-5)
    merged = {}
    for r in ranks:
        for n, w in r["weights"].items():                              # every rank's copy is right
            torch.testing.assert_close(w, ref["weights"][n], rtol=1e-5, atol=5e-6, msg=f"rank {r['rank']} {n}")
        merged.update(r["weights"])
    assert merged.keys() == ref["weights"].keys()                      # and together they hold all


@pytest.mark.parametrize("name", list(PARITY))
def test_expert_parallel_layout_equals_single_process(runs, name):
    out, refs, _, _ = runs
    ref = refs[name.split("_")[0] if name.startswith(("b_", "ds_")) else "a"]
    _assert_same_training(out[name], ref, [1, 2, 3, 4])
    for r in out[name]:                                  # the norm counts every expert once
        assert r["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-5)


def test_experts_are_split_over_ep_ranks(runs):
    out, _, _, _ = runs
    experts = lambda r: {n for n in r["weights"] if ".experts." in n and n.startswith("layers.1.")}  # noqa: E731
    ep4 = [experts(r) for r in out["ep4"]]
    assert all(len(e) == 2 * 1 for e in ep4)                       # 4 experts / EP 4, fc1 and fc2 each
    assert len(set().union(*ep4)) == 8 and ep4[0] == ep4[4]       # rank r and r+4: same experts (EDP 2)


def test_bias_and_balancing_statistics_are_logged(runs):
    out, refs, _, log = runs
    assert "moe aux loss:" in log and "moe load imbalance:" in log and "moe dropped fraction:" in log
    b = refs["b"]["weights"]
    bias = b["layers.1.mlp.router.expert_bias"]
    steps = bias / 0.01                                             # moved in steps of the update rate
    assert bias.abs().sum() > 0 and torch.allclose(steps, steps.round(), atol=1e-4)


@pytest.mark.parametrize("name", RESUMED)
def test_checkpoint_at_ep2_continues_at_other_layouts(runs, name):
    out, refs, _, _ = runs
    _assert_same_training(out[name], refs["a"], [3, 4])


def test_checkpoint_holds_each_expert_once(runs):
    out, _, ck, _ = runs
    assert sorted(out["save_ep2"][-1]["losses"]) == [1, 2]
    reader = CheckpointReader(ck)
    names = set(reader.names("model"))
    assert {f"layers.0.mlp.experts.local_experts.{e}.linear_fc1.weight" for e in range(4)} <= names
    for key, entry in reader.index.items():
        files = [p["file"] for p in entry["pieces"]]
        assert len(files) == len(set(files)), key
        # ZeRO-3: each expert-DP rank wrote its shard of the weights; together they tile each tensor once
        ranges = sorted(tuple(p["range"]) for p in entry["pieces"] if p["tp_rank"] == 0)
        assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), key
        assert ranges[-1][1] == math.prod(entry["pieces"][0]["local_shape"]), key
    expert_weight_files = {p["file"] for k, e in reader.index.items() if k.startswith("model/")
                           and ".experts." in k for p in e["pieces"]}
    assert len(expert_weight_files) > 2  # written from the expert-DP shards, not by the 2 EP ranks only
    expert_optim_files = {p["file"] for k, e in reader.index.items() if k.startswith("optim.exp_avg/")
                          and ".experts." in k for p in e["pieces"]}
    assert len(expert_optim_files) > 2   # ZeRO shards experts' state over expert-DP, not just EP ranks


def test_planner_memory_equals_every_rank_with_experts(runs):
    """Model-state bytes the planner predicts (experts in their own buffer, ZeRO-sharded over expert-DP)
    are what each rank of the ZeRO runs allocated."""
    from megaflow.config import parse_args, set_vocab_size
    from megaflow.parallel.state import coordinates, dense_dims, expert_dims
    from megaflow.planner.memory import model_state_bytes
    out = runs[0]
    for name in ("pp2_ep2_zero", "b_tp2_pp2_ep2_zero", "ep2_zero2", "pp2_ep2_zero3", "b_tp2_pp2_ep2_zero3"):
        cfg = parse_args([str(a) for a in PARITY[name]], world_size=8)
        set_vocab_size(cfg, cfg.data.vocab_size + 1)  # NullTokenizer: the vocabulary + EOD
        p = cfg.parallel
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        for r in out[name]:
            dense = coordinates(r["rank"], dense_dims(8, tp, pp))
            expert = coordinates(r["rank"], expert_dims(8, tp, pp, ep=p.expert_model_parallel_size,
                                                        etp=p.expert_tensor_parallel_size))
            planned = model_state_bytes(cfg, dense["pp"], dense["dp"], expert["edp"])
            for key in ("parameters", "gradients", "optimizer", "num_parameters", "owned_elements"):
                assert planned[key] == r["memory"][key], (name, r["rank"], key)
