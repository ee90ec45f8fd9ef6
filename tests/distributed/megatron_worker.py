"""Worker for test_megatron_parity.py: megaflow's ColumnParallelLinear, RowParallelLinear and
VocabParallelEmbedding against megatron-core's own layers, TP=2 on 2 gloo CPU ranks.

Both sides get the same weight shards (megatron-core built with use_cpu_initialization=True, then our
values copied in; its GPU RNG seeding is never called) and the same inputs; rank 0 writes the largest
output and gradient differences to <out_dir>/megatron.json. Sequence parallelism runs too:
megatron-core allocates its gather buffers on torch.cuda.current_device(), which the worker points
at the CPU (test-only shim; nothing else of CUDA is touched).
"""
import json
import os
import sys
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")
torch.cuda.current_device = lambda: "cpu"  # megatron-core's buffers: see the docstring

from megatron.core import ModelParallelConfig  # noqa: E402
from megatron.core import parallel_state as mpu  # noqa: E402
from megatron.core import tensor_parallel as mtp  # noqa: E402

from megaflow import layers  # noqa: E402
from megaflow.parallel import state  # noqa: E402

OUT = sys.argv[1]
S, B, H, F, V = 8, 2, 16, 32, 64
torch.set_num_threads(1)
st = state.initialize(tp=2, backend="gloo", device="cpu")
mpu.initialize_model_parallel(tensor_model_parallel_size=2, create_gloo_process_groups=False)
assert mpu.get_tensor_model_parallel_rank() == st.tp_rank and mpu.get_tensor_model_parallel_world_size() == 2

g = torch.Generator().manual_seed(0)
W1, B1 = torch.randn(F, H, generator=g) * 0.1, torch.randn(F, generator=g) * 0.1   # column: h -> f
W2, B2 = torch.randn(H, F, generator=g) * 0.1, torch.randn(H, generator=g) * 0.1   # row: f -> h
E = torch.randn(V, H, generator=g)
X = torch.randn(S, B, H, generator=g)
IDS = torch.randint(0, V, (B, S), generator=g)
GY = torch.randn(S, B, H, generator=g)
r = st.tp_rank
results = {}


def diff(a, b):
    return (a.detach() - b.detach()).abs().max().item()


def mcfg(sp):
    return ModelParallelConfig(tensor_model_parallel_size=2, sequence_parallel=sp, use_cpu_initialization=True,
                               params_dtype=torch.float32, perform_initialization=False)


for sp in (False, True):
    init = lambda w: None  # noqa: E731  (weights are copied in below)
    # --- megatron-core: column (h -> f) then row (f -> h), as in an MLP ---
    m_col = mtp.ColumnParallelLinear(H, F, config=mcfg(sp), init_method=init, bias=True, gather_output=False)
    m_row = mtp.RowParallelLinear(F, H, config=mcfg(sp), init_method=init, bias=True, input_is_parallel=True,
                                  skip_bias_add=False)
    ours_col = layers.ColumnParallelLinear(H, F, bias=True, sequence_parallel=sp)
    ours_row = layers.RowParallelLinear(F, H, bias=True, sequence_parallel=sp)
    with torch.no_grad():
        for p in (m_col.weight, ours_col.weight):
            p.copy_(W1.chunk(2, 0)[r])
        for p in (m_col.bias, ours_col.bias):
            p.copy_(B1.chunk(2, 0)[r])
        for p in (m_row.weight, ours_row.weight):
            p.copy_(W2.chunk(2, 1)[r])
        for p in (m_row.bias, ours_row.bias):
            p.copy_(B2)
    x_in = X.chunk(2, 0)[r] if sp else X
    gy = GY.chunk(2, 0)[r] if sp else GY
    xm, xo = x_in.clone().requires_grad_(), x_in.clone().requires_grad_()
    hm, _ = m_col(xm)
    ym, _ = m_row(hm)
    ho = ours_col(xo)
    yo = ours_row(ho)
    ym.backward(gy)
    yo.backward(gy)
    key = "sp" if sp else "nosp"
    results[f"{key}/column_out"] = diff(hm, ho)
    results[f"{key}/row_out"] = diff(ym, yo)
    results[f"{key}/input_grad"] = diff(xm.grad, xo.grad)
    results[f"{key}/grads"] = {name: diff(a.grad, b.grad) for name, a, b in (
        ("column.weight", m_col.weight, ours_col.weight), ("column.bias", m_col.bias, ours_col.bias),
        ("row.weight", m_row.weight, ours_row.weight), ("row.bias", m_row.bias, ours_row.bias))}
    results[f"{key}/out_scale"] = ym.abs().max().item()
    ref = (X @ W1.t() + B1) @ W2.t() + B2                    # the single-process math
    results[f"{key}/vs_single_process"] = diff(yo, ref.chunk(2, 0)[r] if sp else ref)

    # --- VocabParallelEmbedding: ids [b, s]; with sp megatron reduce-scatters to [s/tp, b, h] ---
    m_emb = mtp.VocabParallelEmbedding(V, H, init_method=init, config=mcfg(sp), reduce_scatter_embeddings=sp)
    ours_emb = layers.VocabParallelEmbedding(V, H)
    with torch.no_grad():
        m_emb.weight.copy_(E.chunk(2, 0)[r])
        ours_emb.weight.copy_(E.chunk(2, 0)[r])
    em = m_emb(IDS)                                          # [b, s, h], or [s/tp, b, h] with sp
    eo = ours_emb.forward_reduced(IDS.t() if sp else IDS, sequence_parallel=sp)
    ge = GY.chunk(2, 0)[r] if sp else GY.transpose(0, 1)
    em.backward(ge)
    eo.backward(ge)
    results[f"{key}/embedding_out"] = diff(em, eo)
    results[f"{key}/embedding_grad"] = diff(m_emb.weight.grad, ours_emb.weight.grad)
    results[f"{key}/embedding_grad_scale"] = m_emb.weight.grad.abs().max().item()

# --- vocab-parallel cross entropy (Megatron's label smoothing is defined differently: compare at 0) ---
logits = torch.randn(S, B, V, generator=g) * 2
target = torch.randint(0, V, (S, B), generator=g)
lm = logits.chunk(2, -1)[r].clone().requires_grad_()
lo = logits.chunk(2, -1)[r].clone().requires_grad_()
loss_m = mtp.vocab_parallel_cross_entropy(lm.clone(), target)
loss_o = layers.vocab_parallel_cross_entropy(lo, target)
loss_m.sum().backward()
loss_o.sum().backward()
results["cross_entropy/loss"] = diff(loss_m, loss_o)
results["cross_entropy/grad"] = diff(lm.grad, lo.grad)

if st.rank == 0:
    with open(os.path.join(OUT, "megatron.json"), "w") as fh:
        json.dump(results, fh, indent=1)
dist.barrier()
mpu.destroy_model_parallel()
state.destroy()
