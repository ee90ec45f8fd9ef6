"""Issue 8's proof: checkpoints saved at TP=2 × PP=2 × DP=2 (plain; ZeRO with the interleaved schedule
and --async-save; a tied GPT-2 with ZeRO and sequence parallelism) continue at TP1·PP1·DP1, TP1·PP2·DP4
and TP2·PP1·DP1, with ZeRO switched on or off, interleaved or not, and the continued runs equal the
uninterrupted single-process run: losses, validation loss and final weights within fp32 tolerance
(dropout 0: random streams cannot follow a layout change). The vocabulary pads to 512 rows at TP=2 and
384 at TP=1: the padding takes no part in the loss and stays 0, so re-padding it on load changes
nothing. Two torchrun launches (8 and 2 processes) plus the single-process runs in this process."""
import contextlib
import io
import json
import os

import pytest
import torch

from megaflow.checkpoint.format import CheckpointReader
from megaflow.checkpoint.full_state import load_full_state_dict
from megaflow.parallel import state
from tests.distributed.runs import GPT2, LLAMA, run, split_padding
from tests.launch import torchrun

HERE = os.path.dirname(__file__)
GRID = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
PP2, TP2 = ["--pipeline-model-parallel-size", "2"], ["--tensor-model-parallel-size", "2"]
ZERO = ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather", "--ddp-bucket-size", "4000"]
INTERLEAVED = ["--num-layers-per-virtual-pipeline-stage", "1"]
SAVED = ["plain", "zero", "gpt2"]


def launch(tmp, name, nproc, configs):
    (tmp / f"{name}.json").write_text(json.dumps(configs))
    proc = torchrun(os.path.join(HERE, "layout_worker.py"), nproc, [tmp, tmp / f"{name}.json"], timeout=600)
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
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt_layouts")
    ck = {name: str(tmp / name) for name in SAVED}

    def save(name, base, *flags):
        return base + GRID + list(flags) + ["--save", ck[name], "--save-interval", "100", "--exit-interval", "2"]

    def resume(name, *flags, base=LLAMA):
        return base + list(flags) + ["--load", ck[name]]

    # One 8-process launch: each configuration sets up its own process groups, so the saving runs
    # (TP2·PP2·DP2) and the continued runs at TP1·PP2·DP4 share the launch's start-up cost.
    out, log8 = launch(tmp, "eight", 8, {
        "save_plain": save("plain", LLAMA),
        "save_zero": save("zero", LLAMA, *ZERO, *INTERLEAVED, "--async-save"),
        # no evaluation before this save: only the save waits for the step's parameter all-gathers
        "save_gpt2": save("gpt2", GPT2, *ZERO, "--sequence-parallel", "--eval-interval", "100"),
        "pp2dp4_plain_to_zero_interleaved": resume("plain", *PP2, *ZERO, *INTERLEAVED, "--micro-batch-size", "1"),
        "pp2dp4_zero_to_plain": resume("zero", *PP2),
        "pp2dp4_gpt2": resume("gpt2", *PP2, base=GPT2)})
    more, _ = launch(tmp, "tp2", 2, {"tp2_zero_to_plain": resume("zero", *TP2),
                                     "tp2_plain_to_zero": resume("plain", *TP2, *ZERO)})
    out.update(more)
    logs = {"pp2dp4": log8}
    for name, args in {"tp1_plain": resume("plain"), "tp1_zero_to_zero": resume("zero", *ZERO),
                       "tp1_gpt2": resume("gpt2", base=GPT2),
                       "tp1_no_load_optim": resume("zero", "--no-load-optim")}.items():
        out[name], logs[name] = [None], None
        out[name][0], logs[name] = in_process(args)
    refs = {"llama": in_process(LLAMA)[0], "gpt2": in_process(GPT2)[0]}
    return out, refs, logs, ck


# zero: interleaved -> not (and ZeRO DP 2 -> 1 or 4, or off); plain -> interleaved at PP2 (micro-batch 1:
# the interleaved schedule needs a multiple of PP micro-batches; the loss is the same token mean).
CONTINUED = ["pp2dp4_plain_to_zero_interleaved", "pp2dp4_zero_to_plain", "pp2dp4_gpt2", "tp2_zero_to_plain",
             "tp2_plain_to_zero", "tp1_plain", "tp1_zero_to_zero", "tp1_gpt2"]


@pytest.mark.parametrize("name", CONTINUED)
def test_continued_run_equals_the_uninterrupted_run(runs, name):
    out, refs, _, _ = runs
    ranks, ref = out[name], refs["gpt2" if "gpt2" in name else "llama"]
    assert ref["losses"][4] < ref["losses"][1] - 0.05                 # it trained: state matters
    last = ranks[-1]
    assert sorted(last["losses"]) == [3, 4] and last["consumed_samples"] == 32 and last["iteration"] == 4
    for it in (3, 4):
        assert last["losses"][it] == pytest.approx(ref["losses"][it], rel=1e-5), it
    assert last["valid_losses"][4] == pytest.approx(ref["valid_losses"][4], rel=1e-5)
    merged = {}
    for r in ranks:
        merged.update(r["weights"])
        assert r["padded_vocab_size"] == (512 if name.startswith("tp2") else 384) and r["padding_max"] == 0.0
    assert merged.keys() == ref["weights"].keys()
    for n, w in merged.items():
        torch.testing.assert_close(w, ref["weights"][n], rtol=1e-5, atol=1e-6, msg=n)


def test_saving_runs_trained_like_the_reference(runs):
    out, refs, _, _ = runs
    for name in SAVED:
        losses, ref = out[f"save_{name}"][-1]["losses"], refs["gpt2" if name == "gpt2" else "llama"]
        assert sorted(losses) == [1, 2]
        assert all(losses[i] == pytest.approx(ref["losses"][i], rel=1e-5) for i in (1, 2))


def test_optimizer_state_is_what_makes_the_continuation_exact(runs):
    out, refs, _, _ = runs
    fresh = out["tp1_no_load_optim"][0]["losses"]   # weights and schedule loaded, Adam moments not
    assert sorted(fresh) == [3, 4] and abs(fresh[4] - refs["llama"]["losses"][4]) > 1e-3


def test_each_tensor_stored_once_and_zero_shards_by_every_dp_rank(runs):
    *_, ck = runs
    for name in SAVED:
        reader = CheckpointReader(ck[name])
        assert reader.iteration == 2 and reader.meta["consumed_samples"] == 16
        assert reader.meta["layout"] == {"tp": 2, "pp": 2, "dp": 2, "cp": 1, "vpp": 2 if name == "zero" else 1,
                                         "world_size": 8, "distributed_optimizer": name != "plain"}
        assert len(reader.meta["files"]) == 8                                  # every rank's file (RNG)
        for key, entry in reader.index.items():
            files = [p["file"] for p in entry["pieces"]]
            assert len(files) == len(set(files)), key                      # no replica written twice
            if key.startswith("model/") or name == "plain":
                assert all(f.endswith("dp000.safetensors") for f in files), key
        optim_files = {p["file"].split("_")[-1] for k, e in reader.index.items() if k.startswith("optim.")
                       for p in e["pieces"]}
        assert optim_files == ({"dp000.safetensors"} if name == "plain" else {"dp000.safetensors", "dp001.safetensors"})


def test_layout_change_reseeds_and_says_so(runs):
    _, _, logs, _ = runs
    assert "RNG state not restored (saved at TP=2 PP=2 DP=2, loaded at TP=1 PP=1 DP=1" in logs["tp1_plain"]
    assert "RNG state not restored (saved at TP=2 PP=2 DP=2, loaded at TP=1 PP=2 DP=4" in logs["pp2dp4"]


def test_tools_read_the_interleaved_and_zero_checkpoints_whole(runs):
    """full_state (HF export, generation) reads every saved layout: the interleaved ZeRO checkpoint and the
    tied GPT-2 give the weights the saving runs held at iteration 2."""
    out, *_, ck = runs
    for name in ("zero", "gpt2"):
        cfg, full = load_full_state_dict(ck[name])
        full, padding_max = split_padding(full, cfg.vocab_size)
        assert cfg.padded_vocab_size == 512 and padding_max == 0.0
        held = {}
        for r in out[f"save_{name}"]:
            held.update(r["weights"])
        assert full.keys() == held.keys()
        assert all(torch.equal(full[n], w) for n, w in held.items()), name
