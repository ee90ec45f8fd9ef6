"""Pipeline parallelism on gloo, proven against the single-process run.

Two torchrun launches (pipeline_worker.py) run every configuration; the tests read their results.
    pp4: PP=4 (1F1B with M below/equal/above PP, Llama, uneven split, interleaved V=2) and PP=2×DP=2;
         live-activation counts; TP=2×PP=2 against TP=2×DP=2; sleep-emulated timelines.
    pp2: PP=2 (M = 1, 2, 3; Llama; uneven; interleaved V=2 and V=3); pretrain() at PP=2 with 1F1B and
         interleaved against pretrain() at PP=1; a neighbour that stops answering.
"""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from megaflow.pipeline.plan import warmup_steps
from megaflow.pipeline.simulate import theoretical_bubble
from tests.launch import ROOT, torchrun

HERE = os.path.dirname(__file__)
WORKER = os.path.join(HERE, "pipeline_worker.py")


@pytest.fixture(scope="module")
def pp4(tmp_path_factory):
    out = tmp_path_factory.mktemp("pp4")
    torchrun(WORKER, 4, [out, "pp4"], timeout=300)
    return out


@pytest.fixture(scope="module")
def pp2(tmp_path_factory):
    out = tmp_path_factory.mktemp("pp2")
    torchrun(WORKER, 2, [out, "pp2"], timeout=300)
    return out


def results(out, name):
    files = sorted(glob.glob(os.path.join(out, f"{name}_rank*.json")),
                   key=lambda p: int(p.rsplit("rank", 1)[1].split(".")[0]))
    assert files, f"no results for {name}"
    return [json.load(open(f)) for f in files]


def check_equivalence(rs, pp, chunks, schedule):
    last = [r for r in rs if r["is_last"]]
    assert last and all(r["losses"] for r in last) and not any(r["losses"] for r in rs if not r["is_last"])
    for r in rs:
        assert r["schedule"] == schedule and r["chunks"] == chunks
        if r["is_last"]:  # the per-micro-batch losses of this DP rank, as the single process computes them
            assert r["losses"] == pytest.approx(r["ref_losses"], rel=1e-6, abs=0)
        assert max(r["grad_err"].values()) < 1e-5, {k: v for k, v in r["grad_err"].items() if v >= 1e-5}
        assert r["norm"] == pytest.approx(r["ref_norm"], rel=1e-6)
    # The stages of one pipeline hold every parameter of the model, each layer exactly once.
    dp0 = [r for r in rs if r["dp_rank"] == 0]
    assert len(dp0) == pp
    assert set().union(*(r["grad_err"] for r in dp0)) == set(rs[0]["ref_names"])
    layers = sorted(n for r in dp0 for n in r["layers"])
    assert layers == list(range(len(layers)))


ONE_F_ONE_B = "forward_backward_pipelining_without_interleaving"
INTERLEAVED = "forward_backward_pipelining_with_interleaving"


@pytest.mark.parametrize("name, pp, chunks, schedule", [
    ("eq_pp4_1f1b_m2", 4, 1, ONE_F_ONE_B),          # M below PP
    ("eq_pp4_1f1b_m4", 4, 1, ONE_F_ONE_B),          # M equal to PP
    ("eq_pp4_1f1b_m6", 4, 1, ONE_F_ONE_B),          # M above PP
    ("eq_pp4_1f1b_llama_m5", 4, 1, ONE_F_ONE_B),    # untied output layer, RMSNorm, RoPE, GQA
    ("eq_pp4_uneven_m3", 4, 1, ONE_F_ONE_B),        # 6 layers: 1 / 2 / 2 / 1
    ("eq_pp4_inter_m4", 4, 2, INTERLEAVED),
    ("eq_pp4_inter_m8", 4, 2, INTERLEAVED),
    ("eq_pp4_inter_llama_m4", 4, 2, INTERLEAVED),
    ("eq_pp2dp2_1f1b_m3", 2, 1, ONE_F_ONE_B),       # with data parallelism: DP average of the pipelines
    ("eq_pp2dp2_inter_m2", 2, 2, INTERLEAVED),
])
def test_pp4_world_equals_single_process(pp4, name, pp, chunks, schedule):
    check_equivalence(results(pp4, name), pp, chunks, schedule)


@pytest.mark.parametrize("name, chunks, schedule", [
    ("eq_pp2_1f1b_m1", 1, ONE_F_ONE_B),
    ("eq_pp2_1f1b_m2", 1, ONE_F_ONE_B),
    ("eq_pp2_1f1b_m3", 1, ONE_F_ONE_B),
    ("eq_pp2_1f1b_llama_m3", 1, ONE_F_ONE_B),
    ("eq_pp2_uneven_m2", 1, ONE_F_ONE_B),           # 3 layers: 1 / 2
    ("eq_pp2_recompute_m3", 1, ONE_F_ONE_B),        # --recompute-granularity full
    ("eq_pp2_inter_m2", 2, INTERLEAVED),
    ("eq_pp2_inter_m4", 2, INTERLEAVED),
    ("eq_pp2_inter_llama_m4", 3, INTERLEAVED),      # V = 3
])
def test_pp2_equals_single_process(pp2, name, chunks, schedule):
    check_equivalence(results(pp2, name), 2, chunks, schedule)


@pytest.mark.parametrize("m", [2, 4, 6])
def test_1f1b_holds_at_most_pp_minus_rank_microbatches(pp4, m):
    for r in results(pp4, f"act_pp4_1f1b_m{m}"):
        assert r["forwards"] == m and r["still_live"] == 0
        assert r["peak"] == min(4 - r["pp_rank"], m)
        # Sent outputs are freed: what the schedule still holds is one element per kept output.
        assert r["peak_held_bytes"] <= 4 * (r["peak"] - 1)


def test_without_deallocation_the_sent_outputs_stay_in_memory(pp4):
    """The negative control of the check above: the same run keeping its outputs holds them whole."""
    for r in results(pp4, "act_pp4_1f1b_m6_keep"):
        expected = (min(4 - r["pp_rank"], 6) - 1) * r["activation_bytes"]
        assert r["peak_held_bytes"] == expected


def test_interleaved_activation_bound(pp4):
    for r in results(pp4, "act_pp4_inter_m8"):
        assert r["forwards"] == 16 and r["still_live"] == 0
        assert r["peak"] == warmup_steps(r["pp_rank"], 4, 8, 2) + 1    # chunk-micro-batches
        assert r["peak_held_bytes"] <= 4 * (r["peak"] - 1)


@pytest.fixture(scope="module")
def single_process_runs():
    from megaflow.config import parse_args
    from megaflow.parallel import state
    from megaflow.training.trainer import pretrain
    sys.path.insert(0, HERE)
    from pipeline_worker import TINY
    runs = {}
    try:
        for key, extra in {"1f1b": ["--num-layers", "2", "--global-batch-size", "6"],
                           "inter": ["--num-layers", "4", "--global-batch-size", "8"]}.items():
            try:
                runs[key] = pretrain(parse_args(TINY + extra, world_size=1))
            finally:
                state.destroy()
    finally:
        sys.path.remove(HERE)
    return runs


@pytest.mark.parametrize("key", ["1f1b", "inter"])
def test_pretrain_at_pp2_matches_pp1(pp2, single_process_runs, key):
    ref = single_process_runs[key]
    last = results(pp2, f"train_pp2_{key}")[-1]
    assert last["pp_rank"] == 1
    assert {int(k): v for k, v in last["losses"].items()} == pytest.approx(ref.losses, rel=1e-6)
    assert {int(k): v for k, v in last["valid_losses"].items()} == pytest.approx(ref.valid_losses, rel=1e-6)
    # Tied embeddings: the first stage's table and the last stage's copy stayed identical.
    first = torch.load(os.path.join(pp2, f"train_pp2_{key}_embedding_rank0.pt"))
    copy = torch.load(os.path.join(pp2, f"train_pp2_{key}_embedding_rank1.pt"))
    assert torch.equal(first, copy)


def test_tensor_and_pipeline_parallelism_compose(pp4, single_process_runs):
    """TP=2 × PP=2 (sequence parallel, 1F1B) trains like TP=2 × DP=2 and like one process (same
    model, same batches: the 'inter' reference has 4 layers and global batch 8 too)."""
    pipelined = [r for r in results(pp4, "train_tp2pp2") if r["losses"]]
    reference = [r for r in results(pp4, "train_tp2dp2") if r["losses"]]
    assert len(pipelined) == 2 and all(r["pp_rank"] == 1 for r in pipelined)   # both TP ranks of the last stage
    single = single_process_runs["inter"]
    for r in pipelined:
        assert r["losses"] == pytest.approx(reference[-1]["losses"], rel=1e-5)
        assert r["valid_losses"] == pytest.approx(reference[-1]["valid_losses"], rel=1e-5)
        assert {int(k): v for k, v in r["losses"].items()} == pytest.approx(single.losses, rel=1e-5)


def run_tool(directory, png):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "pipeline_timeline.py"), str(directory),
                           "--out", str(png), "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_timeline_tool_reports_measured_bubble_beside_theory(pp4, tmp_path):
    """Sleep-emulated stages (F 20 ms, B 40 ms per stage, real processes and transfers): the bubble
    simulated from the measured op times equals the formula (when the stages' measured times agree
    within 15%: a loaded machine oversleeps some more than others) and shrinks with interleaving; the
    wall-clock bubble is never below the formula (it adds transfer latency, which swings with the
    machine's load, so only a loose upper bound is asserted)."""
    from PIL import Image
    reports = {}
    for key, v in (("1f1b", 1), ("inter", 2)):
        rep = run_tool(pp4 / f"timeline_{key}", tmp_path / f"{key}.png")
        assert (rep["pp_size"], rep["virtual_pp_size"], rep["num_microbatches"]) == (4, v, 8)
        assert rep["theory"] == pytest.approx(theoretical_bubble(4, 8, v))
        f, b = rep["mean_forward_seconds"], rep["mean_backward_seconds"]
        if max(f) / min(f) < 1.15 and max(b) / min(b) < 1.15:  # load stretches some stages' sleeps more
            assert rep["simulated_with_measured_times"] == pytest.approx(rep["theory"], abs=0.03)
        assert rep["theory"] - 0.02 < rep["measured"] < 1.0, rep
        assert Image.open(tmp_path / f"{key}.png").size[0] == 1500
        reports[key] = rep
    simulated = {k: r["simulated_with_measured_times"] for k, r in reports.items()}
    assert simulated["inter"] < simulated["1f1b"] - 0.05


def test_training_run_records_a_timeline(pp2, tmp_path):
    rep = run_tool(pp2 / "timeline_gpt", tmp_path / "gpt.png")
    docs = [json.load(open(p)) for p in sorted(glob.glob(str(pp2 / "timeline_gpt" / "timeline_rank*.json")))]
    assert [len(d["steps"]) for d in docs] == [3, 3]           # --pipeline-timeline-iters default
    for d in docs:                                             # every F and B of every micro-batch
        events = [tuple(e[:3]) for e in d["steps"][0]["events"] if e[0] in ("F", "B")]
        assert sorted(events) == sorted((op, 0, mb) for op in "FB" for mb in range(3))
    assert rep["pp_size"] == 2 and rep["iteration"] == 3 and 0 < rep["measured"] < 1
    assert (tmp_path / "gpt.png").stat().st_size > 1000


def test_a_hung_neighbour_ends_in_an_error_not_a_hang(pp2):
    r = results(pp2, "timeout")[0]
    assert r["error"] and "rank(s) [1]" in r["error"] and "timed out" in r["error"].lower()
    assert 2.5 < r["seconds"] < 30       # --distributed-timeout-minutes 0.05 = 3 s
