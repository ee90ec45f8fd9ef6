"""Worker: build TP=2 × PP=2 × DP=2 groups on 8 gloo ranks and prove each group's membership with a
collective (the sum of ranks over the group)."""
import json
import os
import sys

import torch
import torch.distributed as dist

from megaflow.parallel import state

st = state.initialize(tp=2, pp=2, backend="gloo", device="cpu")
out = {"rank": st.rank, "tp_rank": st.tp_rank, "dp_rank": st.dp_rank, "pp_rank": st.pp_rank,
       "ranks": st.ranks, "sums": {}}
for name in ("tp", "dp", "pp", "embedding"):
    t = torch.tensor([float(st.rank)])
    dist.all_reduce(t, group=st.groups[name])
    out["sums"][name] = t.item()
with open(os.path.join(sys.argv[1], f"rank{st.rank}.json"), "w") as fh:  # stdout interleaves
    json.dump(out, fh)
state.destroy()
