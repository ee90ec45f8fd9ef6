"""--compile and --gradient-accumulation-fusion under TP/SP, DP/ZeRO and both pipeline schedules, on 2
gloo ranks (perf_worker.py, one launch): the losses of each layout equal the eager unfused run's, and
the compiled blocks traced without a graph break."""
import glob
import json
import os

import pytest

from tests.launch import torchrun

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("perf")
    torchrun(os.path.join(HERE, "perf_worker.py"), 2, [out], timeout=900)
    return out


@pytest.mark.parametrize("layout", ["tp2_sp", "dp2_zero", "dp2_zero2", "dp2_zero3", "pp2_1f1b", "pp2_inter"])
def test_compiled_and_fused_training_matches_eager(results, layout):
    rs = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(results, f"{layout}_rank*.json")))]
    assert len(rs) == 2
    last = [r for r in rs if r["is_last"]]
    assert last
    for r in last:
        assert all(x is not None for x in r["eager"])
        assert r["compiled_fused"] == pytest.approx(r["eager"], rel=1e-5)
    for r in rs:
        assert r["graph_breaks"] == 0 and r["graphs_compiled"] >= 1
