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
        # megaflow's reduce-scatter (gloo: all-to-all + sum in rank order) and all-gather, bit for bit
        assert r["collectives"] == {
            "world": {"size": 8, "reduce_scatter": True, "reduce_scatter_in_place_async": True, "all_gather": True},
            "dp": {"size": 2, "reduce_scatter": True, "reduce_scatter_in_place_async": True, "all_gather": True}}


def _old_three_dim_layout(world_size, tp, pp):
    """The "tp-dp-pp" formulas the five-dimension layout must reproduce when CP = EP = 1."""
    dp = world_size // (tp * pp)
    rank = lambda t, d, p: t + tp * (d + dp * p)  # noqa: E731
    return dict(tp=[[rank(t, d, p) for t in range(tp)] for p in range(pp) for d in range(dp)],
                dp=[[rank(t, d, p) for d in range(dp)] for p in range(pp) for t in range(tp)],
                pp=[[rank(t, d, p) for p in range(pp)] for d in range(dp) for t in range(tp)],
                mp=[[rank(t, d, p) for p in range(pp) for t in range(tp)] for d in range(dp)])


def test_five_dimensions_reduce_to_three_when_cp_and_ep_are_one():
    for world, tp, pp in [(16, 2, 4), (8, 2, 2), (8, 1, 8), (12, 3, 2), (8, 4, 1)]:
        g, old = layout_ranks(world, tp, pp), _old_three_dim_layout(world, tp, pp)
        for kind in old:
            assert g[kind] == old[kind], (world, tp, pp, kind)
        assert g["dp_cp"] == g["dp"] and g["edp"] == g["dp"] and g["etp"] == g["tp"]
        assert g["cp"] == g["ep"] == [[r] for r in range(world)]


def test_context_and_expert_parallel_rank_order():
    # rank = tp + TP·(cp + CP·(dp + DP·pp)); experts: rank = etp + ETP·(ep + EP·edp) + stage offset.
    world, tp, cp, pp = 16, 2, 2, 2  # DP = 2
    g = layout_ranks(world, tp, pp, cp=cp, ep=2, etp=1)
    assert g["tp"][:2] == [[0, 1], [2, 3]]
    assert g["cp"][:3] == [[0, 2], [1, 3], [4, 6]]
    assert g["dp"][:2] == [[0, 4], [1, 5]]
    assert g["dp_cp"][0] == [0, 2, 4, 6]
    assert g["pp"][0] == [0, 8]
    assert g["ep"][:2] == [[0, 1], [2, 3]]            # ETP = 1: neighbouring ranks hold different experts
    assert g["edp"][0] == [0, 2, 4, 6]                # same experts, within one pipeline stage
    assert g["etp"][0] == [0]
    g = layout_ranks(8, 2, 1, ep=2)                   # ETP defaults to TP
    assert g["etp"][0] == [0, 1] and g["ep"][0] == [0, 2] and g["edp"][0] == [0, 4]
    for kind, groups in g.items():
        assert sorted(r for grp in groups for r in grp) == list(range(8)), kind
