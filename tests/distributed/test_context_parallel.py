"""Context parallelism trains exactly like one process (fp32, same weights and data order): losses,
every step's gradient norm, validation losses and final weights, for CP = 2 and CP = 4, each
--cp-comm-type, on plain sequences and on packed documents (--reset-attention-mask
--reset-position-ids --eod-mask-loss, documents crossing the zigzag chunks), in one 4-process launch;
and composed with TP2 + sequence parallelism and with PP2 × DP2 + ZeRO on 8 processes."""
import json
import os

import numpy as np
import pytest
import torch

from megaflow.data.indexed_dataset import IndexedDatasetBuilder
from tests.distributed.runs import LLAMA, reference
from tests.launch import torchrun

HERE = os.path.dirname(__file__)
COMMS = ("p2p", "a2a", "all_gather")
PACKING = ["--reset-attention-mask", "--reset-position-ids", "--eod-mask-loss"]
BASE = [a if a != "4" else "2" for a in LLAMA[:4]] + LLAMA[4:]   # LLAMA with 2 layers
assert BASE[2:4] == ["--num-layers", "2"]


def packed_args(tmp):
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
    args = [a for a in BASE if a != "--mock-data"]
    return args + ["--data-path", prefix, "--split", "98,1,1", "--data-cache-path", str(tmp / "cache")] + PACKING


def cp_configs(tmp, sizes):
    out = {}
    for cp in sizes:
        for comm in COMMS:
            flags = ["--context-parallel-size", str(cp), "--cp-comm-type", comm]
            out[f"cp{cp}_{comm}"] = BASE + flags
            out[f"cp{cp}_{comm}_packed"] = packed_args(tmp) + flags
    return out


@pytest.fixture(scope="module")
def cp_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cp")
    configs = cp_configs(tmp, (2, 4))
    (tmp / "configs.json").write_text(json.dumps(configs))
    torchrun(os.path.join(HERE, "layout_worker.py"), 4, [tmp, tmp / "configs.json"], timeout=600)
    out = {name: [torch.load(tmp / f"{name}.rank{r}.pt", weights_only=False) for r in range(4)]
           for name in configs}
    return out, {"plain": reference(BASE), "packed": reference(packed_args(tmp))}


def assert_same_training(ranks, ref):
    assert ref["losses"][4] < ref["losses"][1] - 0.05              # it trained: weights moved
    last = [r for r in ranks if r["losses"]][0]
    assert sorted(last["losses"]) == [1, 2, 3, 4]
    for it, loss in ref["losses"].items():
        assert last["losses"][it] == pytest.approx(loss, rel=1e-5, abs=1e-6), it
    assert last["valid_losses"] == pytest.approx(ref["valid_losses"], rel=1e-5, abs=1e-6)
    for r in ranks:
        assert r["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-5)
    merged = {}
    for r in ranks:
        merged.update(r["weights"])
    assert merged.keys() == ref["weights"].keys()
    for r in ranks:
        for n, w in r["weights"].items():
            torch.testing.assert_close(w, ref["weights"][n], rtol=1e-5, atol=1e-6, msg=f"rank {r['rank']} {n}")


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("comm", COMMS)
@pytest.mark.parametrize("cp", [2, 4])
def test_context_parallel_equals_single_process(cp_results, cp, comm, packed):
    out, refs = cp_results
    name = f"cp{cp}_{comm}" + ("_packed" if packed else "")
    assert_same_training(out[name], refs["packed" if packed else "plain"])
