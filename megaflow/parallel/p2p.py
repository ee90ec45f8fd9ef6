"""Point-to-point transfers between neighbouring pipeline stages.

One call posts every send and receive of a schedule step at once (torch.distributed.batch_isend_irecv)
and returns without waiting (post): each received tensor comes back as an Incoming, waited for only
when the step that consumes it runs, and the sends as an Outgoing, waited for when the schedule needs
the transfer finished (at the latest, at the end of the step). A sender thus never idles until its
neighbour is ready to receive, and a transfer overlaps whatever compute runs between its post and its
wait. (With NCCL the batch is one coalesced operation: waiting for any part of it waits, on the GPU
stream only, for all of it.) exchange() is the blocking form. Shapes and dtype are known ahead
(sequence × micro-batch × hidden, the sequence split over TP under sequence parallelism), so receivers
allocate their buffers without a shape handshake; a send of any other shape is refused rather than left to corrupt the receiver.

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


class _Batch:
    """The works of one posted batch; a failure or timeout is reported naming the peers."""

    def __init__(self, works, peers, ops):
        self.works, self.peers = works, peers
        # Gloo returns one work per operation; NCCL one coalesced work for the batch.
        self.per_op = len(works) == ops

    def wait(self, index=None):
        works = self.works if index is None or not self.per_op else [self.works[index]]
        try:
            for work in works:
                work.wait()
        except RuntimeError as e:
            st = state.get()
            raise PipelineCommError(f"pipeline stage {st.pp_rank} (rank {st.rank}): transfer with rank(s) "
                                    f"{self.peers} failed or timed out ({e}); did a neighbouring stage die or "
                                    "hang?") from e

    def done(self, index=None) -> bool:
        works = self.works if index is None or not self.per_op else [self.works[index]]
        return all(w.is_completed() for w in works)


class Incoming:
    """A received tensor whose transfer may still be in flight: wait() returns it once it arrived."""

    def __init__(self, batch: _Batch, index: int, tensor: torch.Tensor):
        self._batch, self._index, self._tensor = batch, index, tensor

    def wait(self) -> torch.Tensor:
        if self._batch is not None:
            self._batch.wait(self._index)
            self._batch = None
        return self._tensor


class Outgoing:
    """The sends of one batch; keeps the sent storage alive until wait() (or done()) says it left."""

    def __init__(self, batch: _Batch, indices, tensors):
        self._batch, self._indices, self._tensors = batch, list(indices), tensors

    def done(self) -> bool:
        return self._batch is None or all(self._batch.done(i) for i in self._indices)

    def wait(self) -> None:
        if self._batch is not None:
            for i in self._indices:
                self._batch.wait(i)
            self._batch, self._tensors = None, None


def post(sends: Sequence[tuple[str, int, torch.Tensor]], recvs: Sequence[tuple[str, int]],
         shape: Sequence[int], dtype: torch.dtype) -> tuple[list[Incoming], Outgoing]:
    """Post all `sends` (peer, tag, tensor) and `recvs` (peer, tag) in one batch, without waiting.
    Returns an Incoming per receive (in the order of `recvs`) and the Outgoing of the sends. A sent
    tensor's storage is held by the Outgoing: the caller may drop or free its own reference."""
    st = state.get()
    if not sends and not recvs:
        return [], Outgoing(None, (), None)
    if st.pp_size == 1:
        raise PipelineCommError("pipeline transfer requested with a single pipeline stage")
    shape = tuple(shape)
    group = st.groups["pp"]
    ops, sent, received = [], [], []
    for peer, tag, tensor in sends:
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise PipelineCommError(f"pipeline send of {tuple(tensor.shape)} {tensor.dtype} to the {peer} stage; "
                                    f"the receiver expects {shape} {dtype}")
        # A tensor object of its own (same storage): the schedule may swap the data of the one it
        # holds (deallocate_output) while this send is in flight.
        sent.append(tensor.detach().contiguous())
        ops.append(dist.P2POp(dist.isend, sent[-1], peer_rank(peer), group, tag))
    for peer, tag in recvs:
        buf = torch.empty(shape, dtype=dtype, device=st.device)
        received.append(buf)
        ops.append(dist.P2POp(dist.irecv, buf, peer_rank(peer), group, tag))
    peers = sorted({peer_rank(p) for p, *_ in list(sends) + list(recvs)})
    try:
        batch = _Batch(dist.batch_isend_irecv(ops), peers, len(ops))
    except RuntimeError as e:
        raise PipelineCommError(f"pipeline stage {st.pp_rank} (rank {st.rank}): posting transfers with rank(s) "
                                f"{peers} failed ({e}); did a neighbouring stage die?") from e
    incoming = [Incoming(batch, len(sends) + i, buf) for i, buf in enumerate(received)]
    return incoming, Outgoing(batch, range(len(sends)), sent)


def exchange(sends: Sequence[tuple[str, int, torch.Tensor]], recvs: Sequence[tuple[str, int]],
             shape: Sequence[int], dtype: torch.dtype) -> list[torch.Tensor]:
    """post() and wait for everything. Returns the received tensors in the order of `recvs`."""
    incoming, outgoing = post(sends, recvs, shape, dtype)
    got = [i.wait() for i in incoming]
    outgoing.wait()
    return got


def activation_shape(cfg, micro_batch_size: Optional[int] = None) -> tuple[int, int, int]:
    """[s, b, h] of the hidden state passed between stages (s/CP of the sequence under context
    parallelism, and of that s/TP under sequence parallelism)."""
    s = cfg.data.seq_length // cfg.parallel.context_parallel_size
    if cfg.parallel.sequence_parallel:
        s //= state.get().tp_size
    return (s, micro_batch_size or cfg.training.micro_batch_size, cfg.model.hidden_size)
