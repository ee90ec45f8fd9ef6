"""The layout search and tools/estimate.py: candidates are valid megaflow configurations, fixed flags stay
fixed, the memory and time models move the right way, and the recommended flags dry-run cleanly."""
import sys

import pytest

from megaflow.config import parse_args, set_vocab_size
from megaflow.planner.perf import Cluster, step_time
from megaflow.planner.search import candidates, evaluate, search
from megaflow.training.dry_run import dry_run

sys.path.insert(0, "tools")
import estimate  # noqa: E402

MODEL = ["--model-style", "llama", "--num-layers", "8", "--hidden-size", "1024", "--num-attention-heads", "16",
         "--group-query-attention", "--num-query-groups", "4", "--seq-length", "2048", "--vocab-size", "32000",
         "--tokenizer-type", "NullTokenizer", "--global-batch-size", "64", "--bf16", "--low-precision-params"]
CLUSTER = Cluster(gpus=16, gpus_per_node=8, memory_gib=24)


def base(extra=(), world=16):
    cfg = parse_args(MODEL + list(extra), world_size=world, check=False)
    set_vocab_size(cfg, 32000)
    return cfg


def test_every_candidate_is_a_valid_layout_of_the_cluster():
    seen = set()
    for cfg in candidates(base(), CLUSTER):
        p = cfg.parallel
        assert p.tensor_model_parallel_size * p.pipeline_model_parallel_size * cfg.data_parallel_size == 16
        assert p.tensor_model_parallel_size <= 8                       # TP stays inside a node
        assert cfg.training.global_batch_size % (cfg.training.micro_batch_size * cfg.data_parallel_size) == 0
        seen.add((p.tensor_model_parallel_size, p.pipeline_model_parallel_size))
    assert {(1, 1), (4, 2), (4, 4), (2, 8)} <= seen
    assert not any(tp == 8 for tp, _ in seen)  # 4 query groups cannot be split 8 ways


def test_flags_given_by_the_user_stay_fixed():
    plans = search(base(["--tensor-model-parallel-size", "4", "--recompute-granularity", "full"]), CLUSTER,
                   fixed={"tp", "recompute"})
    assert plans and all(p.cfg.parallel.tensor_model_parallel_size == 4 for p in plans)
    assert all(p.cfg.model.recompute_granularity == "full" for p in plans)


def _plan(**changes):
    cfg = base()
    for section, name, value in changes.get("set", []):
        setattr(getattr(cfg, section), name, value)
    from megaflow.config import validate
    validate(cfg)
    return evaluate(cfg, CLUSTER)


def test_memory_and_time_move_the_right_way():
    plain = _plan(set=[("parallel", "tensor_model_parallel_size", 2)])
    full = _plan(set=[("parallel", "tensor_model_parallel_size", 2), ("model", "recompute_granularity", "full")])
    zero = _plan(set=[("parallel", "tensor_model_parallel_size", 2), ("parallel", "use_distributed_optimizer", True)])
    assert full.memory["activations"] < 0.5 * plain.memory["activations"]  # the fp32 logits stay
    assert full.time["compute"] > 1.25 * plain.time["compute"]            # one more forward of the layers
    assert zero.memory["optimizer"] < plain.memory["optimizer"] / 6        # 12 bytes / 8 DP ranks
    assert plain.time["tp_comm"] > 0 and _plan().time["tp_comm"] == 0


def test_the_bubble_follows_the_schedule_formula():
    cfg = base(["--pipeline-model-parallel-size", "4", "--micro-batch-size", "1"])
    from megaflow.config import validate
    validate(cfg)
    t = step_time(cfg, CLUSTER)
    m = 64 // 4
    assert t["bubble_fraction"] == pytest.approx(3 / (m + 3))
    cfg.parallel.num_layers_per_virtual_pipeline_stage = 1
    validate(cfg)
    assert step_time(cfg, CLUSTER)["bubble_fraction"] == pytest.approx(3 / (2 * m + 3))


def test_estimate_cli_recommends_flags_that_dry_run_cleanly(capsys):
    assert estimate.main(["--gpus", "16", "--gpu-memory-gib", "24", "--top", "3"] + MODEL) == 0
    out = capsys.readouterr().out
    best = out.split("best: ", 1)[1].splitlines()[0].split()
    cfg = parse_args(MODEL + best + ["--dry-run", "--world-size", "16", "--device", "cuda"])
    assert "dry run OK" in dry_run(cfg)


def test_estimate_cli_says_when_nothing_fits(capsys):
    assert estimate.main(["--gpus", "8", "--gpu-memory-gib", "4.2"] + MODEL) == 1
    assert "nothing fits" in capsys.readouterr().out
