"""Point-to-point transfers between neighbouring pipeline stages.

One call posts every send and receive of a schedule step at once (torch.distributed.batch_isend_irecv)
and waits for all of them. Shapes and dtype are known ahead (sequence × micro-batch × hidden, the
sequence split over TP under sequence parallelism), so receivers allocate their buffers without a
shape handshake; a send of any other shape is refused rather than left to corrupt the receiver.

Neighbours are taken around the ring of the pipeline group: the last stage's "next" is the first stage
(the interleaved schedule sends the last stage's chunk output to the first stage's next chunk). Each
message is tagged by kind (activations / gradients): with PP = 2 both neighbours are the same rank.
With PP = 1 nothing is ever sent (gloo cannot send to itself).

Waits use the pipeline group's timeout (--distributed-timeout-minutes): a rank whose neighbour died or
hung raises an error naming the neighbour instead of waiting forever.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megaflow.parallel import state

NEXT, PREV = "next", "prev"


class PipelineCommError(RuntimeError):
    """A pipeline transfer that failed or timed out; names the peer."""


def peer_rank(peer: str) -> int:
    """Global rank of this rank's next or previous pipeline neighbour (ring order)."""
    st = state.get()
    ranks = st.ranks["pp"]
    step = 1 if peer == NEXT else -1
    return ranks[(st.pp_rank + step) % st.pp_size]


def exchange(sends: Sequence[tuple[str, int, torch.Tensor]], recvs: Sequence[tuple[str, int]],
             shape: Sequence[int], dtype: torch.dtype) -> list[torch.Tensor]:
    """Post all `sends` (peer, tag, tensor) and `recvs` (peer, tag) in one batch and wait for them.
    Returns the received tensors in the order of `recvs`."""
    st = state.get()
    if not sends and not recvs:
        return []
    if st.pp_size == 1:
        raise PipelineCommError("pipeline transfer requested with a single pipeline stage")
    shape = tuple(shape)
    group = st.groups["pp"]
    ops, received = [], []
    for peer, tag, tensor in sends:
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise PipelineCommError(f"pipeline send of {tuple(tensor.shape)} {tensor.dtype} to the {peer} stage; "
                                    f"the receiver expects {shape} {dtype}")
        ops.append(dist.P2POp(dist.isend, tensor.contiguous(), peer_rank(peer), group, tag))
    for peer, tag in recvs:
        buf = torch.empty(shape, dtype=dtype, device=st.device)
        received.append(buf)
        ops.append(dist.P2POp(dist.irecv, buf, peer_rank(peer), group, tag))
    try:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    except RuntimeError as e:
        peers = sorted({peer_rank(p) for p, *_ in list(sends) + list(recvs)})
        raise PipelineCommError(f"pipeline stage {st.pp_rank} (rank {st.rank}): transfer with rank(s) {peers} "
                                f"failed or timed out ({e}); did a neighbouring stage die or hang?") from e
    return received


def activation_shape(cfg, micro_batch_size: Optional[int] = None) -> tuple[int, int, int]:
    """[s, b, h] of the hidden state passed between stages (s/CP of the sequence under context
    parallelism, and of that s/TP under sequence parallelism)."""
    s = cfg.data.seq_length // cfg.parallel.context_parallel_size
    if cfg.parallel.sequence_parallel:
        s //= state.get().tp_size
    return (s, micro_batch_size or cfg.training.micro_batch_size, cfg.model.hidden_size)
