"""Worker: context-parallel attention (every --cp-comm-type, with and without packed documents) on
this rank's zigzag tokens, against full causal attention computed here on the whole sequence.
Writes OUT/rank{r}.pt with the largest differences of the output and of dQ, dK, dV."""
import os
import sys

import torch

from megaflow.layers.context_attention import COMM_TYPES, context_parallel_attention
from megaflow.parallel import context_parallel as cpc
from megaflow.parallel import state


def full_attention(q, k, v, cu, scale):
    """Materialised causal (per-document) attention on the whole sequence: the oracle."""
    b, n, s, _ = q.shape
    g = n // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    pos = torch.arange(s)
    allowed = (pos[None, :] <= pos[:, None]).expand(b, s, s).clone()
    if cu is not None:
        for i in range(b):
            doc = torch.bucketize(pos, cu[i], right=True)
            allowed[i] &= doc[:, None] == doc[None, :]
    scores = ((q @ k.transpose(-1, -2)) * scale).masked_fill(~allowed[:, None], float("-inf"))
    return scores.softmax(-1) @ v


out_dir, backend = sys.argv[1], sys.argv[2]
st = state.initialize(cp=int(os.environ["WORLD_SIZE"]))
torch.manual_seed(0)
b, n, g, s, d = 2, 4, 4, 48, 16                      # 4 heads: a2a needs heads divisible by CP
dtype = torch.float64 if backend == "torch" else torch.float32
q, k, v, do = (torch.randn(b, h, s, d, dtype=dtype) for h in (n, g, g, n))
# Documents cross chunk boundaries; the second sample is one document.
cu = torch.tensor([[0, 5, 17, 30, 48], [0, 48, 48, 48, 48]])
idx = cpc.zigzag_index(s, st.cp_rank, st.cp_size)
result = {}
for packed in (False, True):
    c = cu if packed else None
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    out_ref = full_attention(*ref, c, d ** -0.5)
    out_ref.backward(do)
    for comm in COMM_TYPES:
        mine = [t[:, :, idx].clone().requires_grad_() for t in (q, k, v)]
        out = context_parallel_attention(*mine, comm_type=comm, cu_seqlens_bt=c, backend=backend)
        out.backward(do[:, :, idx])
        diffs = [(out - out_ref[:, :, idx]).abs().max().item()]
        diffs += [(m.grad - r.grad[:, :, idx]).abs().max().item() for m, r in zip(mine, ref)]
        result[(comm, packed)] = diffs
torch.save(result, os.path.join(out_dir, f"rank{st.rank}.pt"))
state.destroy()
