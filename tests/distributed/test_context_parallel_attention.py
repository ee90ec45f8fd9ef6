"""Context-parallel attention on 4 gloo processes (CP = 4): each --cp-comm-type (p2p ring, a2a,
all_gather), on plain and on packed sequences (documents crossing the zigzag chunks), gives every rank
the output and the dQ, dK, dV of its tokens as full causal attention on one process: exactly with the
torch backend (fp64), to fp32 rounding with the Triton kernels through the ring (interpreter)."""
import os

import pytest
import torch

from tests.launch import torchrun

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def diffs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cp_attention")
    torchrun(os.path.join(HERE, "cp_attention_worker.py"), 4, [tmp], timeout=300, env={"TRITON_INTERPRET": "1"})
    return [torch.load(tmp / f"rank{r}.pt") for r in range(4)]


@pytest.mark.parametrize("backend,comm,tol", [("torch", "p2p", 1e-12), ("torch", "a2a", 1e-12),
                                              ("torch", "all_gather", 1e-12), ("triton", "p2p", 2e-5)])
@pytest.mark.parametrize("packed", [False, True])
def test_cp4_attention_equals_full_attention(diffs, comm, packed, backend, tol):
    for rank, d in enumerate(diffs):
        assert max(d[(backend, comm, packed)]) < tol, (rank, d[(backend, comm, packed)])
