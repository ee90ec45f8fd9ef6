"""Worker: context-parallel attention (every --cp-comm-type, with and without packed documents, torch
backend in fp64 and the Triton kernels in fp32 under the interpreter) on this rank's zigzag tokens,
against full causal attention computed here on the whole sequence. Writes OUT/rank{r}.pt with the
largest differences of the output and of dQ, dK, dV."""
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


out_dir = sys.argv[1]
st = state.initialize(cp=int(os.environ["WORLD_SIZE"]))
torch.manual_seed(0)
b, n, g, s, d = 2, 4, 2, 48, 16                      # grouped-query heads (a2a repeats them)
q, k, v, do = (torch.randn(b, h, s, d, dtype=torch.float64) for h in (n, g, g, n))
# Documents cross chunk boundaries; the second sample is one document.
cu = torch.tensor([[0, 5, 17, 30, 48], [0, 48, 48, 48, 48]])
idx = cpc.zigzag_index(s, st.cp_rank, st.cp_size)
result = {}
for packed in (False, True):
    c = cu if packed else None
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    out_ref = full_attention(*ref, c, d ** -0.5)
    out_ref.backward(do)
    # The Triton kernels through the ring (the same block calls serve a2a and all_gather; the
    # interpreter is slow, so those two run on the torch backend only).
    for backend, dtype, comms in (("torch", torch.float64, COMM_TYPES), ("triton", torch.float32, ("p2p",))):
        for comm in comms:
            mine = [t[:, :, idx].to(dtype).requires_grad_() for t in (q, k, v)]
            out = context_parallel_attention(*mine, comm_type=comm, cu_seqlens_bt=c, backend=backend)
            out.backward(do[:, :, idx].to(dtype))
            diffs = [(out - out_ref[:, :, idx]).abs().max().item()]
            diffs += [(m.grad - r.grad[:, :, idx]).abs().max().item() for m, r in zip(mine, ref)]
            result[(backend, comm, packed)] = diffs
torch.save(result, os.path.join(out_dir, f"rank{st.rank}.pt"))
state.destroy()
