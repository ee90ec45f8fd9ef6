"""Pipeline schedules without processes: step orders, the simulated plans of every rank (deadlock,
message identity, bubble, activation bound), layer assignment, config checks, deallocation, timelines."""
import importlib.util
import json
import os

import pytest
import torch

from megaflow.config import ConfigError, config_from_kwargs, set_vocab_size, virtual_pipeline_size
from megaflow.model import stage_layer_numbers
from megaflow.parallel import state
from megaflow.pipeline import plan, timeline
from megaflow.pipeline.plan import BACKWARD, FORWARD, Comm, Step, build_plan, step_order, warmup_steps
from megaflow.pipeline.schedules import deallocate_output
from megaflow.pipeline.simulate import PlanError, check_all, simulate, theoretical_bubble

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def ops(steps):
    return " ".join(f"{s.op}{s.microbatch}" + (f"c{s.chunk}" if s.chunk else "") for s in steps)


def test_1f1b_order_warmup_steady_cooldown():
    # PP=4, M=6: rank 0 warms up with 3 forwards, rank 3 (last) with none.
    assert ops(step_order(0, 4, 6)) == "F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5"
    assert ops(step_order(3, 4, 6)) == "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5"
    assert ops(step_order(1, 4, 2)) == "F0 F1 B0 B1"                 # fewer micro-batches than warmup
    assert ops(step_order(0, 1, 3)) == "F0 B0 F1 B1 F2 B2"           # PP=1: gradient accumulation
    assert ops(step_order(2, 4, 3, forward_only=True)) == "F0 F1 F2"
    assert build_plan(0, 1, 3) == step_order(0, 1, 3)                # PP=1: no transfers at all


def test_interleaved_order_and_warmup_formula():
    # FORMATS.md §3: warmup = (PP − rank − 1)·2 + (V − 1)·PP
    assert [warmup_steps(r, 4, 8, 2) for r in range(4)] == [10, 8, 6, 4]
    assert warmup_steps(0, 4, 4, 4) == 16                            # capped at M·V
    order = step_order(1, 2, 4, 2)                                   # PP=2, V=2, M=4, warmup 2
    assert ops(order) == ("F0 F1 F0c1 B0c1 F1c1 B1c1 F2 B0 F3 B1 F2c1 B2c1 F3c1 B3c1 B2 B3")
    with pytest.raises(ValueError, match="multiple of the pipeline size"):
        step_order(0, 4, 6, 2)


def test_plan_posts_receives_one_step_ahead():
    p = build_plan(1, 4, 2)   # middle stage: steps F0 F1 B0 B1
    A, G = plan.ACT, plan.GRAD
    T = plan.Transfer
    assert p == [Comm((), (T(plan.PREV, A, 0, 0), T(plan.PREV, A, 0, 1))),   # inputs of F0 and F1
                 Step(FORWARD, 0, 0),
                 Comm((T(plan.NEXT, A, 0, 0),), (T(plan.NEXT, G, 0, 0),)),    # send F0, receive for B0
                 Step(FORWARD, 0, 1),
                 Comm((T(plan.NEXT, A, 0, 1),), (T(plan.NEXT, G, 0, 1),)),
                 Step(BACKWARD, 0, 0),
                 Comm((T(plan.PREV, G, 0, 0),), ()),
                 Step(BACKWARD, 0, 1),
                 Comm((T(plan.PREV, G, 0, 1),), ())]


def test_every_small_plan_is_deadlock_free_and_delivers_the_right_tensors():
    # PP 1..8, V 1..4, M 1..16 (multiples of PP when interleaved), training and forward-only.
    assert check_all() == 412


def test_the_simulator_catches_a_deadlocking_plan(monkeypatch):
    """Rank 0 starting with a backward waits for a gradient that needs its own first forward: the
    check above can fail."""
    real = plan.step_order

    def backward_first(rank, *a, **k):
        order = real(rank, *a, **k)
        if rank == 0:
            first_b = next(i for i, s in enumerate(order) if s.op == BACKWARD)
            order = [order[first_b]] + order[:first_b] + order[first_b + 1:]
        return order
    monkeypatch.setattr(plan, "step_order", backward_first)
    with pytest.raises(PlanError, match="deadlock"):
        simulate(2, 4, 2)


def test_the_simulator_catches_a_misdelivered_tensor(monkeypatch):
    real = plan.step_order

    def swapped(rank, *a, **k):  # rank 1 runs micro-batches 0 and 1 in the wrong order
        order = real(rank, *a, **k)
        if rank == 1:
            order = [Step(s.op, s.chunk, 1 - s.microbatch) if s.microbatch < 2 else s for s in order]
        return order
    monkeypatch.setattr(plan, "step_order", swapped)
    with pytest.raises(PlanError, match="expects"):
        simulate(2, 3)


@pytest.mark.parametrize("pp, m, v", [(2, 1, 1), (2, 3, 1), (4, 4, 1), (4, 8, 1), (8, 16, 1),
                                      (2, 4, 2), (4, 8, 2), (4, 16, 2), (4, 8, 4), (8, 16, 2)])
def test_ideal_bubble_equals_the_formula(pp, m, v):
    assert simulate(pp, m, v).mean_bubble() == pytest.approx(theoretical_bubble(pp, m, v), abs=1e-12)


def test_activation_bound_in_the_simulated_schedules():
    for m in (1, 3, 4, 9):
        assert simulate(4, m).peak_live == {r: min(4 - r, m) for r in range(4)}
    assert simulate(4, 8, 2).peak_live == {r: warmup_steps(r, 4, 8, 2) + 1 for r in range(4)}


def tiny(**kw):
    args = dict(num_layers=8, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=100,
                micro_batch_size=2)
    args.update(kw)
    world = args.pop("world_size", args.get("pipeline_model_parallel_size", 1))
    cfg = config_from_kwargs(world_size=world, **args)
    set_vocab_size(cfg, 100)
    return cfg


def test_layer_assignment_even_uneven_and_virtual():
    cfg = tiny(pipeline_model_parallel_size=4)
    assert [stage_layer_numbers(cfg, r, 4) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    cfg = tiny(num_layers=7, pipeline_model_parallel_size=3, decoder_first_pipeline_num_layers=1)
    assert [stage_layer_numbers(cfg, r, 3) for r in range(3)] == [[0], [1, 2, 3], [4, 5, 6]]
    cfg = tiny(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=2, global_batch_size=4)
    assert virtual_pipeline_size(cfg) == 2
    assert [[stage_layer_numbers(cfg, r, 2, v) for v in range(2)] for r in range(2)] == \
        [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]


@pytest.mark.parametrize("kw, message", [
    (dict(num_layers=6, pipeline_model_parallel_size=4), r"--num-layers \(6\) must be divisible"),
    (dict(num_layers=8, pipeline_model_parallel_size=4, decoder_first_pipeline_num_layers=3),
     "cannot be split evenly"),
    (dict(num_layers=4, pipeline_model_parallel_size=2, decoder_first_pipeline_num_layers=1,
          decoder_last_pipeline_num_layers=2), "cannot be split evenly"),
    (dict(num_layers=4, decoder_first_pipeline_num_layers=2), "needs --pipeline-model-parallel-size > 1"),
    (dict(num_layers=4, num_layers_per_virtual_pipeline_stage=1), "needs --pipeline-model-parallel-size > 1"),
    (dict(num_layers=8, pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=3,
          global_batch_size=4), "must divide the layers per pipeline stage"),
    (dict(num_layers=8, pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=4,
          global_batch_size=4), "one chunk per stage is plain 1F1B"),
    (dict(num_layers=8, pipeline_model_parallel_size=4, num_layers_per_virtual_pipeline_stage=1,
          global_batch_size=12), r"number of micro-batches .* = 6\) to be a multiple of"),
    (dict(num_layers=8, pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1,
          decoder_first_pipeline_num_layers=2, global_batch_size=4), "cannot be combined"),
])
def test_impossible_pipeline_configs_fail_at_config_time(kw, message):
    kw.setdefault("world_size", kw.get("pipeline_model_parallel_size", 1))
    with pytest.raises(ConfigError, match=message):
        tiny(**kw)


@pytest.fixture
def fake_stage():
    """Pretend to be one rank of a pipeline (building a stage needs no communication)."""
    saved = state._STATE

    def make(pp_rank, pp_size, virtual_pp=1):
        state._STATE = state.ParallelState(world_size=pp_size, rank=pp_rank, pp_size=pp_size, pp_rank=pp_rank,
                                           virtual_pp_size=virtual_pp)
    yield make
    state._STATE = saved


def test_stage_flags_and_tied_embedding_marks(fake_stage):
    from megaflow.model import build_model, global_named_parameters
    cfg = tiny(num_layers=4, pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1,
               global_batch_size=4)
    fake_stage(0, 2, 2)
    first = build_model(cfg)
    assert isinstance(first, torch.nn.ModuleList) and len(first) == 2
    assert [(c.pre_process, c.post_process) for c in first] == [(True, False), (False, False)]
    assert first[0].word_embeddings.weight.shared_embedding          # tied, output layer elsewhere
    fake_stage(1, 2, 2)
    last = build_model(cfg)
    assert [(c.pre_process, c.post_process) for c in last] == [(False, False), (False, True)]
    names = dict(global_named_parameters(last))
    assert names["word_embeddings.weight"] is last[1].output_layer.weight  # the copy, same global name
    assert last[1].output_layer.weight.shared_embedding
    assert sorted({n.split(".")[1] for n in names if n.startswith("layers.")}) == ["1", "3"]
    fake_stage(0, 1)
    single = build_model(tiny(num_layers=2))
    assert not getattr(single.word_embeddings.weight, "shared_embedding", False)


def test_deallocated_output_keeps_its_graph_and_shape():
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 2, 8)
    grad = torch.randn(4, 2, 8)
    out = torch.tanh(x @ w) + x
    torch.autograd.backward(out, grad)
    expected, w.grad = w.grad.clone(), None
    out = torch.tanh(x @ w) + x
    deallocate_output(out)
    assert out.shape == (4, 2, 8) and out.untyped_storage().nbytes() == 4
    torch.autograd.backward(out, grad)
    assert torch.equal(w.grad, expected)
    with pytest.raises(RuntimeError, match="view"):
        deallocate_output((x @ w)[0])


def test_recording_is_off_outside_a_recorded_step():
    with timeline.record(FORWARD, 0, 0):
        pass
    with timeline.recording() as events:
        with timeline.record(FORWARD, 1, 2):
            pass
    assert [e[:3] for e in events] == [(FORWARD, 1, 2)] and events[0][3] <= events[0][4]
    with timeline.record(BACKWARD, 0, 0):
        pass
    assert len(events) == 1


def _doc(pp_rank, pp, m, events):
    return {"rank": pp_rank, "pp_rank": pp_rank, "pp_size": pp, "tp_rank": 0, "dp_rank": 0, "virtual_pp_size": 1,
            "num_microbatches": m, "steps": [{"iteration": 1, "events": events}]}


def test_measured_bubble_of_the_ideal_schedule_and_the_drawing(tmp_path):
    """Feed the tool the simulated ideal schedule (PP=4, M=8, F=1, B=2): it must measure the formula."""
    sim = simulate(4, 8)
    for r in range(4):
        with open(tmp_path / f"timeline_rank{r}.json", "w") as fh:
            json.dump(_doc(r, 4, 8, [list(e) for e in sim.events[r]]), fh)
    spec = importlib.util.spec_from_file_location("pipeline_timeline", os.path.join(ROOT, "tools",
                                                                                    "pipeline_timeline.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    rep = timeline.measure(timeline.load(str(tmp_path)))
    assert rep["measured"] == pytest.approx(3 / 11) and rep["theory"] == pytest.approx(3 / 11)
    assert rep["measured_per_stage"] == pytest.approx([3 / 11] * 4)
    assert rep["simulated_with_measured_times"] == pytest.approx(3 / 11)
    assert tool.main([str(tmp_path), "--out", str(tmp_path / "t.png")]) == 0
    from PIL import Image
    img = Image.open(tmp_path / "t.png").convert("RGB")
    assert img.size[0] == tool.WIDTH
    # Stage 0 runs F0 during [0, 1], then waits for its first gradient during [4, 10] (span 33).
    x_of = lambda t: int(tool.LABEL_W + t / 33 * (tool.WIDTH - tool.LABEL_W - 2 * tool.PAD))  # noqa: E731
    y = 18 * 2 + 2 * tool.PAD + tool.ROW_H // 2
    assert img.getpixel((x_of(0.2), y)) == tool.FORWARD_COLOURS[0]
    assert img.getpixel((x_of(7), y)) == tool.WAIT
    assert img.getpixel((x_of(10.5), y)) == tool.BACKWARD_COLOURS[0]
