"""tools/checkpoint/reshard.py and tools/checkpoint/inspect_checkpoint.py on a checkpoint trained in this process.
The vocabulary (299 + EOD) pads to 384 at TP=1 and 512 at TP=2, so resharding re-pads the embedding,
the output layer and their optimizer state."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from megaflow.checkpoint.reshard import read_all
from megaflow.config import ConfigError
from megaflow.parallel import state
from tests.distributed.runs import LLAMA, run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = LLAMA


def tool(name):
    path = os.path.join(ROOT, "tools", "checkpoint", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"{name}_tool", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def train(*extra):
    try:
        return run(TRAIN + [str(a) for a in extra])
    finally:
        state.destroy()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tools")
    train("--save", tmp / "a", "--save-interval", 100, "--exit-interval", 2)
    assert tool("reshard").main(["--load", str(tmp / "a"), "--save", str(tmp / "b"), "--tensor-model-parallel-size",
                                 "2", "--pipeline-model-parallel-size", "2", "--data-parallel-size", "2",
                                 "--use-distributed-optimizer"]) == 0
    tool("reshard").main(["--load", str(tmp / "b"), "--save", str(tmp / "c")])          # back to TP1·PP1·DP1
    return {name: str(tmp / name) for name in "abc"}


def test_reshard_splits_every_tensor_and_round_trips_exactly(ckpts):
    cfg_a, meta_a, a = read_all(ckpts["a"])
    cfg_b, meta_b, b = read_all(ckpts["b"])
    assert (cfg_a.padded_vocab_size, cfg_b.padded_vocab_size) == (384, 512)
    assert meta_b["layout"] == {"tp": 2, "pp": 2, "dp": 2, "vpp": 1, "world_size": 8, "distributed_optimizer": True}
    assert sorted(meta_b["files"]) == [f"mp_rank_{t:02d}_{p:03d}_dp{d:03d}.safetensors"
                                       for t in range(2) for p in range(2) for d in range(2)]
    assert {k.split("/")[0] for k in a} == {"model", "optim.exp_avg", "optim.exp_avg_sq"} and a.keys() == b.keys()
    for key, t in a.items():
        if "word_embeddings" in key or "output_layer" in key:
            assert torch.equal(b[key][:384], t) and not b[key][384:].any(), key
            assert not t[300:].any(), key                   # padding rows: 0, and Adam's moments too
        else:
            assert torch.equal(b[key], t), key
        entry = meta_b["tensors"][key]                  # TP shards (norms: 1) × ZeRO ranges (model: 1)
        tp_shards = 1 if key.endswith("norm.weight") else 2
        assert (entry["partition_dim"] is None) == (tp_shards == 1), key
        assert len(entry["pieces"]) == tp_shards * (2 if key.startswith("optim.") else 1), key
    for field in ("consumed_samples", "scheduler", "scalars", "optimizer"):
        assert meta_b[field] == meta_a[field], field
    assert not meta_b["rng"]
    _, meta_c, c = read_all(ckpts["c"])
    assert c.keys() == a.keys() and all(torch.equal(c[k], a[k]) for k in a)
    assert meta_c["layout"]["tp"] == 1 and len(meta_c["files"]) == 1


def test_training_continues_from_the_resharded_checkpoint_exactly(ckpts):
    """A TP=1 run loading the TP2·PP2·DP2 files continues exactly as from the original checkpoint (which
    continues as the uninterrupted run: tests/e2e/test_training.py, tests/distributed/test_checkpoint_layouts.py)."""
    from_a, from_b = train("--load", ckpts["a"]), train("--load", ckpts["b"])
    assert sorted(from_b["losses"]) == [3, 4] and from_b["consumed_samples"] == 32
    assert from_b["losses"] == from_a["losses"] and from_b["valid_losses"] == from_a["valid_losses"]
    assert all(torch.equal(from_b["weights"][n], w) for n, w in from_a["weights"].items())


def test_inspect_prints_config_iteration_and_tensors(ckpts, capsys):
    script = os.path.join(ROOT, "tools", "checkpoint", "inspect_checkpoint.py")   # as a user runs it
    out = subprocess.run([sys.executable, script, "--load", ckpts["b"]], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert "iteration 2 | consumed samples 16 | layout TP=2 PP=2 DP=2" in out and "optimizer AdamW" in out
    assert "tensor_model_parallel_size=2" in out and "num_query_groups=2" in out       # the config
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("optim.exp_avg/word_embeddings.weight"))
    assert line.split()[1:] == ["[512,", "64]", "float32", "4", "pieces", "128.00", "KiB"]
    assert "mp_rank_01_001_dp001.safetensors" in out
    tool("inspect_checkpoint").main(["--load", ckpts["a"], "--json"])
    d = json.loads(capsys.readouterr().out)
    assert d["iteration"] == 2 and d["tensors"]["model/word_embeddings.weight"]["shape"] == [384, 64]


def test_reshard_refuses_a_layout_the_model_cannot_take(ckpts, tmp_path):
    with pytest.raises(ConfigError, match=r"--num-attention-heads \(4\) must be divisible by "
                                          r"--tensor-model-parallel-size \(3\)"):
        tool("reshard").main(["--load", ckpts["a"], "--save", str(tmp_path / "x"), "--tensor-model-parallel-size", "3"])
    assert not os.path.exists(tmp_path / "x")
