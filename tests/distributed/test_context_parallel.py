"""Context parallelism trains exactly like one process (fp32, same weights and data order): losses,
every step's gradient norm, validation losses and final weights, for CP = 2 and CP = 4, each
--cp-comm-type, on plain sequences and on packed documents (--reset-attention-mask
--reset-position-ids --eod-mask-loss, documents crossing the zigzag chunks), ZeRO-2/3 sharded over
CP2×DP2, and multi-latent attention (packed at CP2, a2a at CP4), in one 4-process launch;
and composed with TP2 + sequence parallelism and with PP2 × DP2 + ZeRO on 8 processes. Checkpoints
change CP on resume (CP4 → CP1, CP1 → CP8): the continued runs equal the uninterrupted one and
restore the data position and the random streams."""
import contextlib
import io
import json
import os

import numpy as np
import pytest
import torch

from megaflow.data.indexed_dataset import IndexedDatasetBuilder
from megaflow.parallel import state
from tests.distributed.runs import DEEPSEEK_MLA, LLAMA, reference, run
from tests.launch import torchrun

HERE = os.path.dirname(__file__)
COMMS = ("p2p", "a2a", "all_gather")
PACKING = ["--reset-attention-mask", "--reset-position-ids", "--eod-mask-loss"]
BASE = [a if a != "4" else "2" for a in LLAMA[:4]] + LLAMA[4:]   # LLAMA with 2 layers
assert BASE[2:4] == ["--num-layers", "2"]
MLA_BASE = DEEPSEEK_MLA[:3] + ["2"] + DEEPSEEK_MLA[4:]            # DeepSeek-V3's attention, 2 layers


def packed_args(tmp, base=BASE):
    """BASE on a corpus of short documents (1-20 tokens + EOD; each counts up from a random token, so
    there is something to learn): every 32-token sample packs several."""
    prefix = str(tmp / "short_docs")
    if not os.path.exists(prefix + ".idx"):
        rng = np.random.RandomState(0)
        b = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
        for _ in range(400):
            doc = np.append((rng.randint(0, 255) + np.arange(rng.randint(1, 21))) % 255, 255)  # EOD = 255
            b.add_document(doc, [len(doc)])
        b.finalize(prefix + ".idx")
    args = [a for a in base if a != "--mock-data"]
    return args + ["--data-path", prefix, "--split", "98,1,1", "--data-cache-path", str(tmp / "cache")] + PACKING


def cp_configs(tmp, sizes):
    out = {}
    for cp in sizes:
        for comm in COMMS:
            flags = ["--context-parallel-size", str(cp), "--cp-comm-type", comm]
            out[f"cp{cp}_{comm}"] = BASE + flags
            out[f"cp{cp}_{comm}_packed"] = packed_args(tmp) + flags
    return out


ZERO = ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather", "--ddp-bucket-size", "4000"]
NOT_RESTORED = "RNG state not restored"
ZERO_STAGES = {
    "cp2_dp2_zero2": lambda tmp: BASE + ["--context-parallel-size", "2"] + ZERO + ["--zero-stage", "2"],
    "cp2_dp2_zero3_packed": lambda tmp: packed_args(tmp) + ["--context-parallel-size", "2"] + ZERO
    + ["--zero-stage", "3"],
}
# Multi-latent attention through the ring (values padded to the query/key width, model/attention.py)
MLA_CP = {"mla_cp2_packed": lambda tmp: packed_args(tmp, MLA_BASE) + ["--context-parallel-size", "2"],
          "mla_cp4_a2a": lambda tmp: MLA_BASE + ["--context-parallel-size", "4", "--cp-comm-type", "a2a"]}


def saving(ckpt):
    return ["--save", str(ckpt), "--save-interval", "100", "--exit-interval", "2"]


def launch(tmp, name, nproc, configs):
    (tmp / f"{name}.json").write_text(json.dumps(configs))
    proc = torchrun(os.path.join(HERE, "layout_worker.py"), nproc, [tmp, tmp / f"{name}.json"], timeout=900)
    out = {n: [torch.load(tmp / f"{n}.rank{r}.pt", weights_only=False) for r in range(nproc)] for n in configs}
    return out, proc.stdout


def in_process(args):
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            result = run(args)
    finally:
        state.destroy()
    return result, buf.getvalue()


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("cp")


@pytest.fixture(scope="module")
def refs(tmp):
    return {"plain": reference(BASE), "packed": reference(packed_args(tmp)), "mla": reference(MLA_BASE),
            "mla_packed": reference(packed_args(tmp, MLA_BASE))}


@pytest.fixture(scope="module")
def cp_results(tmp):
    """The 4-process launch: the CP grid, and a run that saves at CP4 (DP1) after 2 iterations."""
    configs = cp_configs(tmp, (2, 4))
    configs["save_cp4"] = BASE + ["--context-parallel-size", "4"] + saving(tmp / "ck_cp4")
    # ZeRO-2 and -3 shard over DP×CP (CP2 × DP2 here), as stage 1 does.
    for name, args in {**ZERO_STAGES, **MLA_CP}.items():
        configs[name] = args(tmp)
    out, _ = launch(tmp, "four", 4, configs)
    return out


@pytest.fixture(scope="module")
def composed(tmp, cp_results):
    """The 8-process launch: TP2·CP2·DP2 with sequence parallelism (a2a: one kv head per TP rank,
    repeated), CP2·PP2·DP2 with ZeRO on packed documents, and a resume at CP8 (two tokens per chunk)
    of a checkpoint saved by one process; then one process resumes the CP4 checkpoint. TP, PP and DP
    stay, so the random streams carry over."""
    _, log = in_process(BASE + saving(tmp / "ck_cp1"))
    out, log8 = launch(tmp, "eight", 8, {
        "tp2_cp2_sp_a2a": BASE + ["--tensor-model-parallel-size", "2", "--context-parallel-size", "2",
                                  "--sequence-parallel", "--cp-comm-type", "a2a"],
        "cp2_pp2_dp2_zero_packed": packed_args(tmp) + ["--context-parallel-size", "2",
                                                       "--pipeline-model-parallel-size", "2"] + ZERO,
        "resume_cp8": BASE + ["--context-parallel-size", "8", "--load", str(tmp / "ck_cp1")],
    })
    out["resume_cp1"], log1 = in_process(BASE + ["--load", str(tmp / "ck_cp4")])
    out["resume_cp1"] = [out["resume_cp1"]]
    return out, log8 + log1


def assert_same_training(ranks, ref, first=1):
    """Iterations first..4 (a resumed run logs from 3) against the uninterrupted reference."""
    assert ref["losses"][4] < ref["losses"][1] - 0.05              # it trained: weights moved
    last = [r for r in ranks if r["losses"]][0]
    assert sorted(last["losses"]) == list(range(first, 5))
    for it in range(first, 5):
        assert last["losses"][it] == pytest.approx(ref["losses"][it], rel=1e-5, abs=1e-6), it
    want = {it: v for it, v in ref["valid_losses"].items() if it >= first}   # evaluated after 2 and 4
    assert sorted(last["valid_losses"]) == sorted(want)
    assert last["valid_losses"] == pytest.approx(want, rel=1e-5, abs=1e-6)
    for r in ranks:
        assert r["grad_norms"] == pytest.approx(ref["grad_norms"][first - 1:], rel=1e-5)
    merged = {}
    for r in ranks:
        merged.update(r["weights"])
    assert merged.keys() == ref["weights"].keys()
    # Weights to 1e-5 absolute: AdamW's step g/(√v + ε) amplifies the rounding of a gradient element
    # near ε. Measured: packed documents, one embedding element whose gradient was 3e-7 before clipping
    # (the smallest of its row) moved 3e-6 apart after 4 steps at lr 3e-3; every other element < 2e-7.
    for r in ranks:
        for n, w in r["weights"].items():
            torch.testing.assert_close(w, ref["weights"][n], rtol=1e-5, atol=1e-5, msg=f"rank {r['rank']} {n}")


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("comm", COMMS)
@pytest.mark.parametrize("cp", [2, 4])
def test_context_parallel_equals_single_process(cp_results, refs, cp, comm, packed):
    name = f"cp{cp}_{comm}" + ("_packed" if packed else "")
    assert_same_training(cp_results[name], refs["packed" if packed else "plain"])


@pytest.mark.parametrize("name", list(ZERO_STAGES))
def test_zero_stages_shard_over_dp_and_cp(cp_results, refs, name):
    assert_same_training(cp_results[name], refs["packed" if name.endswith("packed") else "plain"])
    for r in cp_results[name]:
        assert r["memory"]["gradients"] < r["memory"]["num_parameters"] * 4 / 3   # shards of 4 (DP×CP)


@pytest.mark.parametrize("name", list(MLA_CP))
def test_multi_latent_attention_under_context_parallelism(cp_results, refs, name):
    assert_same_training(cp_results[name], refs["mla_packed" if name.endswith("packed") else "mla"])


@pytest.mark.parametrize("name,ref", [("tp2_cp2_sp_a2a", "plain"), ("cp2_pp2_dp2_zero_packed", "packed")])
def test_context_parallel_composes_on_eight_processes(composed, refs, name, ref):
    assert_same_training(composed[0][name], refs[ref])


@pytest.mark.parametrize("name", ["resume_cp8", "resume_cp1"])
def test_checkpoint_resumes_at_another_cp(composed, refs, name):
    out, log = composed
    ranks = out[name]
    assert all(r["consumed_samples"] == 32 and r["iteration"] == 4 for r in ranks)   # data position kept
    assert_same_training(ranks, refs["plain"], first=3)
    assert "loaded checkpoint" in log and NOT_RESTORED not in log                  # random streams kept
