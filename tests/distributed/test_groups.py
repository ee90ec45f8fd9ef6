import json
import os

from megaflow.parallel.state import layout_ranks
from tests.launch import torchrun

HERE = os.path.dirname(__file__)


def test_layout_matches_megatron_example():
    # FORMATS.md §3: 16 ranks, TP=2, PP=4 (DP=2)
    g = layout_ranks(16, tp=2, pp=4)
    assert g["tp"][:3] == [[0, 1], [2, 3], [4, 5]]
    assert g["dp"][:3] == [[0, 2], [1, 3], [4, 6]]
    assert g["pp"][:2] == [[0, 4, 8, 12], [1, 5, 9, 13]]
    assert g["embedding"][0] == [0, 12]
    # Every rank in exactly one group of each kind.
    for kind in ("tp", "dp", "pp"):
        assert sorted(r for grp in g[kind] for r in grp) == list(range(16))


def test_eight_gloo_processes_build_the_exact_groups(tmp_path):
    torchrun(os.path.join(HERE, "groups_worker.py"), 8, [tmp_path], timeout=240)
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert len(results) == 8
    expected = {"tp": [[0, 1], [2, 3], [4, 5], [6, 7]], "dp": [[0, 2], [1, 3], [4, 6], [5, 7]],
                "pp": [[0, 4], [1, 5], [2, 6], [3, 7]], "embedding": [[0, 4], [1, 5], [2, 6], [3, 7]]}
    for r in results:
        rank = r["rank"]
        assert r["tp_rank"] == rank % 2 and r["dp_rank"] == (rank // 2) % 2 and r["pp_rank"] == rank // 4
        for kind, groups in expected.items():
            mine = next(g for g in groups if rank in g)
            assert r["ranks"][kind] == mine
            assert r["sums"][kind] == float(sum(mine)), kind  # the collective really ran over that group
