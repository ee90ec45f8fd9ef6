"""ZeRO-2 and ZeRO-3 at DP = 4 (4 gloo processes, one launch) against stage 1 and the single-process
run: losses, validation losses, every step's gradient norm and the final weights (fp32, tight), with
two micro-batches per rank (gradient accumulation); greedy generation through the gathering hooks;
the bytes model states really hold (storages reachable from parameters and optimizer) at rest and
inside a step against the ZeRO bounds and the planner; checkpoints saved at stage 3 resumed bitwise
and carried on at stage 1 with TP=2 × DP=2, then in one process without ZeRO."""
import json
import os

import pytest
import torch

from megaflow.config import parse_args, set_vocab_size
from megaflow.parallel import state
from megaflow.planner.memory import model_state_bytes
from tests.distributed.runs import LLAMA, reference, run
from tests.distributed.zero3_worker import extras
from tests.launch import torchrun

HERE = os.path.dirname(__file__)
BASE = LLAMA + ["--micro-batch-size", "1"]                  # DP=4: 2 micro-batches per rank and step
Z1 = ["--use-distributed-optimizer", "--ddp-bucket-size", "5000"]
Z2 = ["--use-distributed-optimizer", "--zero-stage", "2", "--ddp-bucket-size", "5000"]
Z3 = ["--data-parallel-sharding-strategy", "optim_grads_params"]   # Megatron's name for --zero-stage 3
TP2 = ["--tensor-model-parallel-size", "2"]


def configs(ck):
    return {
        "zero1": BASE + Z1,
        "zero2": BASE + Z2,
        "zero3": BASE + Z3,
        "zero3_save": BASE + Z3 + ["--save", ck["z3"], "--save-interval", "100", "--exit-interval", "2"],
        "zero3_resume": BASE + Z3 + ["--load", ck["z3"]],
        # stage 3 at DP=4 -> stage 1 at TP=2 x DP=2 (one more step, saved) -> one process (test below)
        "zero1_tp2_from_zero3": BASE + TP2 + Z1 + ["--load", ck["z3"], "--save", ck["z1"], "--save-interval",
                                                   "100", "--exit-interval", "3"],
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero3")
    ck = {"z3": str(tmp / "ckpt_zero3"), "z1": str(tmp / "ckpt_zero1")}
    cfgs = configs(ck)
    (tmp / "configs.json").write_text(json.dumps(cfgs))
    torchrun(os.path.join(HERE, "zero3_worker.py"), 4, [tmp, tmp / "configs.json"], timeout=500)
    out = {name: [torch.load(tmp / f"{name}.rank{r}.pt", weights_only=False) for r in range(4)] for name in cfgs}
    try:
        ref = run(BASE, extra=lambda trainer: {"generated": extras(trainer)["generated"]})
    finally:
        state.destroy()
    single_from_zero1 = reference(BASE + ["--load", ck["z1"]])
    return out, ref, single_from_zero1


def assert_same_run(ranks, ref, rtol=1e-5, atol=1e-6):
    losses = ranks[-1]["losses"]
    assert sorted(losses) == sorted(ref["losses"]) == [1, 2, 3, 4]
    for it, loss in ref["losses"].items():
        assert losses[it] == pytest.approx(loss, rel=rtol, abs=atol), it
    assert ranks[-1]["valid_losses"] == pytest.approx(ref["valid_losses"], rel=rtol, abs=atol)
    for r in ranks:
        assert r["grad_norms"] == pytest.approx(ref["grad_norms"], rel=rtol)
        for name, w in ref["weights"].items():
            torch.testing.assert_close(r["weights"][name], w, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3"])
def test_dp4_equals_single_process(results, name):
    out, ref, _ = results
    assert ref["losses"][4] < ref["losses"][1] - 0.05                   # it trained
    assert_same_run(out[name], ref)


def test_zero3_equals_zero1(results):
    out, _, _ = results
    zero1 = dict(out["zero1"][0], losses=out["zero1"][-1]["losses"], valid_losses=out["zero1"][-1]["valid_losses"])
    assert_same_run(out["zero3"], zero1)


def test_generation_through_gathering_hooks(results):
    out, ref, _ = results
    assert len(ref["generated"]) == 6
    for r in out["zero3"] + out["zero2"]:
        assert r["generated"] == ref["generated"]


def test_zero3_gathers_per_layer_with_prefetch_and_bounded_live_layers(results):
    out, _, _ = results
    for r in out["zero3"]:
        units = r["unit_bytes"]                                 # the chunk unit + 4 layers
        assert len(units) == 5 and "chunk" in units
        layers = sorted((b for n, b in units.items() if n != "chunk"), reverse=True)
        # per step and micro-batch (2): 5 units gathered for forward, 3 again for backward (the chunk
        # unit and the last layer stay gathered in between: no pipeline); evaluation adds more
        assert r["gathers"] >= 4 * 2 * (5 + 3)
        assert r["gathers_waited_in_forward"] > 0                # prefetched gathers waited by a forward hook
        assert r["peak_gathered"] <= units["chunk"] + layers[0] + layers[1]


def test_measured_model_state_bytes_within_zero_bounds_and_planner(results):
    out, _, _ = results
    for name, stage in (("zero1", 1), ("zero2", 2), ("zero3", 3)):
        for r in out[name]:
            phi, dp = r["memory"]["num_parameters"], r["dp_size"]
            pad = sum(r["bucket_padding"])
            low = (phi + pad) / dp - pad                          # the fewest elements a shard owns
            steps = 4 * 64                                        # Adam's step scalars, one per piece at most
            rest = r["rest_bytes"]
            # inside a step, transient fp32 gradients: the bucket being filled, two reductions in
            # flight (bucket + received shard each), and gradients autograd has not handed over yet
            bucket = 4 * max(r["bucket_sizes"])
            grads_in_flight = 3 * bucket + 2 * bucket / dp
            if stage == 3:
                assert 16 * low <= rest <= 16 * (phi + pad) / dp + steps
                gathers = r["unit_bytes"]["chunk"] + 2 * max(r["unit_bytes"].values())  # the chunk + 2 layers
                assert rest < r["peak_bytes"] <= rest + gathers + grads_in_flight + bucket
            elif stage == 2:
                assert 4 * phi + 12 * low <= rest <= 4 * (phi + pad) + 12 * (phi + pad) / dp + steps
                assert rest < r["peak_bytes"] <= rest + grads_in_flight + 4 * r["largest_parameter"]
                assert r["peak_bytes"] < rest + 4 * phi                   # never a full gradient buffer
            else:
                assert 8 * phi + 8 * low <= rest <= 8 * (phi + pad) + 8 * (phi + pad) / dp + steps
            cfg = parse_args([str(a) for a in configs({"z3": "x", "z1": "x"})[name]], world_size=4)
            set_vocab_size(cfg, cfg.data.vocab_size + 1)          # NullTokenizer: the vocabulary + EOD
            plan = model_state_bytes(cfg, 0, r["rank"])
            planned = plan["parameters"] + plan["gradients"] + plan["optimizer"]
            assert planned == pytest.approx(rest, rel=0.05), (name, planned, rest)


def test_zero3_checkpoint_resumes_bitwise(results):
    out, _, _ = results
    full, first, resumed = out["zero3"][0], out["zero3_save"][0], out["zero3_resume"][0]
    assert sorted(first["losses"]) == [1, 2] and sorted(resumed["losses"]) == [3, 4]
    for it in (3, 4):
        assert resumed["losses"][it] == full["losses"][it], it
    for name, w in full["weights"].items():
        assert torch.equal(resumed["weights"][name], w), name


def test_zero3_to_zero1_tp2_to_single_process(results):
    out, ref, single = results
    moved = out["zero1_tp2_from_zero3"][-1]
    assert sorted(moved["losses"]) == [3] and moved["consumed_samples"] == 24
    assert moved["losses"][3] == pytest.approx(ref["losses"][3], rel=1e-5)
    assert sorted(single["losses"]) == [4] and single["consumed_samples"] == 32
    assert single["losses"][4] == pytest.approx(ref["losses"][4], rel=1e-5)
    for name, w in ref["weights"].items():
        torch.testing.assert_close(single["weights"][name], w, rtol=1e-5, atol=1e-6, msg=name)
