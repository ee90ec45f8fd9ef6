"""Muon across layouts: TP=2 × DP=2 with ZeRO (whole matrices assigned to DP ranks, Newton-Schulz on the
TP-gathered matrix) trains like one process — losses, gradient norms, final weights (fp32 tolerance) —
and its checkpoints carry Muon's state: a run saved at TP2×DP2 (ZeRO) and continued at TP1×DP4 (ZeRO),
or rewritten to one process by the offline reshard tool and continued there, ends like the
uninterrupted run. One 4-process launch; references in this process."""
import json
import os

import pytest
import torch

from megaflow.checkpoint.reshard import reshard
from tests.distributed.runs import LLAMA, reference
from tests.launch import torchrun

HERE = os.path.dirname(__file__)
MUON = LLAMA + ["--optimizer", "muon", "--muon-use-nesterov", "--muon-fp32-matmul-prec", "high"]
TP2 = ["--tensor-model-parallel-size", "2"]
ZERO = ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather", "--ddp-bucket-size", "4000"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("muon")
    saved = str(tmp / "saved")
    configs = {"tp2_dp2_zero": MUON + TP2 + ZERO,
               "save_at_2": MUON + TP2 + ZERO + ["--save", saved, "--save-interval", "100", "--exit-interval", "2"],
               "dp4_zero_continued": MUON + ZERO + ["--load", saved]}
    (tmp / "configs.json").write_text(json.dumps(configs))
    torchrun(os.path.join(HERE, "layout_worker.py"), 4, [tmp, tmp / "configs.json"], timeout=900)
    out = {n: [torch.load(tmp / f"{n}.rank{r}.pt", weights_only=False) for r in range(4)] for n in configs}
    reshard(saved, str(tmp / "one"), tp=1, pp=1)
    out["resharded_continued"] = [reference(MUON + ["--load", str(tmp / "one")])]
    return out, reference(MUON)


def check_like(ranks, ref, iterations):
    losses = ranks[-1]["losses"]
    assert sorted(losses) == iterations
    for it in iterations:
        assert losses[it] == pytest.approx(ref["losses"][it], rel=1e-5, abs=1e-6), it
    for r in ranks:
        for n, w in r["weights"].items():
            torch.testing.assert_close(w, ref["weights"][n], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, r=r, n=n: f"rank {r['rank']} {n}: {m}")  # with the figures


def test_tp2_dp2_zero_equals_one_process(runs):
    out, ref = runs
    assert ref["losses"][4] < ref["losses"][1] - 0.05                    # it trained
    check_like(out["tp2_dp2_zero"], ref, [1, 2, 3, 4])
    for r in out["tp2_dp2_zero"]:
        assert r["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-5)


def test_whole_matrices_are_spread_over_dp_ranks(runs):
    out, ref = runs
    owned = [r["memory"]["owned_elements"] for r in out["tp2_dp2_zero"]]
    total = ref["memory"]["num_parameters"]
    # Each rank owns about half of its TP shard (whole Muon matrices + AdamW bucket shards), not all.
    assert all(0.3 * total / 2 < n < 0.7 * total / 2 for n in owned), (owned, total)


@pytest.mark.parametrize("name", ["dp4_zero_continued", "resharded_continued"])
def test_muon_state_survives_checkpoint_and_reshard(runs, name):
    out, ref = runs
    saved = out["save_at_2"][-1]["losses"]                                # the saving run, until it stopped
    assert saved == pytest.approx({it: ref["losses"][it] for it in (1, 2)}, rel=1e-5, abs=1e-6)
    ranks = out[name]
    assert sorted(ranks[-1]["losses"]) == [3, 4]                          # resumed at iteration 2
    check_like(ranks, ref, [3, 4])
