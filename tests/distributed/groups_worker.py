"""Worker: build TP=2 × PP=2 × DP=2 groups on 8 gloo ranks and prove each group's membership with a
collective (the sum of ranks over the group); then megaflow's reduce-scatter and all-gather
(parallel/collectives.py) over the world and over a subgroup, against sums made here in rank order."""
import json
import os
import sys

import torch
import torch.distributed as dist

from megaflow.parallel import collectives, state

st = state.initialize(tp=2, pp=2, backend="gloo", device="cpu")
out = {"rank": st.rank, "tp_rank": st.tp_rank, "dp_rank": st.dp_rank, "pp_rank": st.pp_rank,
       "ranks": st.ranks, "sums": {}}
for name in ("tp", "dp", "pp", "embedding"):
    t = torch.tensor([float(st.rank)])
    dist.all_reduce(t, group=st.groups[name])
    out["sums"][name] = t.item()


def inputs(rank, n):  # every rank's input is known to every rank: the expected sums are made here
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(100 + rank))


out["collectives"] = {}
for name, group in (("world", None), ("dp", st.groups["dp"])):
    members = list(range(dist.get_world_size())) if group is None else dist.get_process_group_ranks(group)
    size, me = len(members), members.index(st.rank)
    expected = inputs(members[0], 4 * size)
    for r in members[1:]:  # ((x0 + x1) + x2) + ...: the documented order, in fp32
        expected = expected + inputs(r, 4 * size)
    mine = expected[4 * me:4 * (me + 1)]
    reduced = torch.empty(4, 3)
    collectives.reduce_scatter(reduced, inputs(st.rank, 4 * size), group=group)
    bucket = inputs(st.rank, 4 * size)  # output a view of the input, reduced asynchronously (ZeRO buckets)
    collectives.reduce_scatter(bucket[4 * me:4 * (me + 1)], bucket, group=group, async_op=True).wait()
    gathered = torch.empty(4 * size, 3)
    collectives.all_gather(gathered, inputs(st.rank, 4), group=group)
    out["collectives"][name] = {
        "size": size, "reduce_scatter": torch.equal(reduced, mine),
        "reduce_scatter_in_place_async": torch.equal(bucket[4 * me:4 * (me + 1)], mine),
        "all_gather": torch.equal(gathered, torch.cat([inputs(r, 4) for r in members]))}
with open(os.path.join(sys.argv[1], f"rank{st.rank}.json"), "w") as fh:  # stdout interleaves
    json.dump(out, fh)
state.destroy()
