"""Context parallelism's data layout and communication: the zigzag split of a sequence, the ring
exchange of ring attention, and the autograd collectives of the all-gather and all-to-all variants.

Zigzag ("load-balanced") layout: a sequence of S tokens is cut into 2·CP chunks of C = S / (2·CP);
CP rank r holds chunks r and 2·CP − 1 − r, in that order. Under causal attention every rank then
does the same work (an early chunk sees few keys, its mirror many). `zigzag_runs(r)` names the two
runs (local start, global start, length) of rank r; attention layers compute with those positions.

Shape legend: b batch, n heads, s local sequence (2·C), d head dim; tensors [b, n, s, d] unless said.
Every function here is a no-op (or identity) when CP = 1; the attention math is in
layers/context_attention.py and kernels/attention_blocks.py.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megaflow.parallel import collectives, state


def zigzag_runs(cp_rank: int, cp_size: int, local_len: int) -> list:
    """[(local start, global start, length)] of the tokens CP rank `cp_rank` holds, local_len = 2·C."""
    c = local_len // 2
    if cp_size == 1:
        return [(0, 0, local_len)]
    return [(0, cp_rank * c, c), (c, (2 * cp_size - 1 - cp_rank) * c, c)]


def zigzag_index(seq_len: int, cp_rank: int, cp_size: int, device=None) -> torch.Tensor:
    """The global positions rank cp_rank holds, in its local order."""
    c = seq_len // (2 * cp_size)
    return torch.cat([torch.arange(g, g + n, device=device)
                      for _, g, n in zigzag_runs(cp_rank, cp_size, 2 * c)])


def split_for_rank(t_bs: torch.Tensor, cp_rank: int, cp_size: int, dim: int = 1) -> torch.Tensor:
    """This rank's zigzag share of a [b, s, ...] tensor (a copy; the sequence is dimension `dim`)."""
    if cp_size == 1:
        return t_bs
    chunks = t_bs.chunk(2 * cp_size, dim=dim)
    return torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]], dim=dim)


def _cp():
    st = state.get()
    return st, st.groups.get("cp"), st.ranks.get("cp", [st.rank])


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the context-parallel group, in place (token counts and loss sums of a sequence)."""
    st, group, _ = _cp()
    if st.cp_size > 1:
        dist.all_reduce(t, group=group)
    return t


class RingExchange:
    """Send a tensor to the next CP rank and receive the previous rank's, asynchronously: start()
    posts both, wait() returns the received tensor. Each kind of message has its own tag so the
    key/value ring and the gradient ring never match each other's messages (gloo matches by tag;
    NCCL matches in posting order, which is the same on every rank)."""

    def __init__(self, tag: int = 0):
        st, self.group, ranks = _cp()
        i = ranks.index(st.rank)
        self.next, self.prev = ranks[(i + 1) % len(ranks)], ranks[(i - 1) % len(ranks)]
        self.tag, self._ops, self._recv = tag, [], None

    def start(self, send: torch.Tensor) -> None:
        send = send.contiguous()
        self._recv = torch.empty_like(send)
        ops = [dist.P2POp(dist.isend, send, self.next, self.group, self.tag),
               dist.P2POp(dist.irecv, self._recv, self.prev, self.group, self.tag)]
        self._ops = dist.batch_isend_irecv(ops)
        self._send = send  # keep alive until the send completes

    def wait(self) -> torch.Tensor:
        for op in self._ops:
            op.wait()
        self._ops, self._send = [], None
        return self._recv


def all_gather_stacked(t: torch.Tensor) -> torch.Tensor:
    """[CP, *t.shape]: every CP rank's tensor, in CP-rank order."""
    st, group, _ = _cp()
    t = t.contiguous()
    out = torch.empty((st.cp_size * t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    collectives.all_gather(out, t, group=group)   # ranks concatenated along dimension 0
    return out.unflatten(0, (st.cp_size, t.shape[0]))


def reduce_scatter_stacked(t_stacked: torch.Tensor) -> torch.Tensor:
    """The inverse of all_gather_stacked's layout: sum over ranks of [CP, ...], this rank's slot."""
    st, group, _ = _cp()
    out = torch.empty(t_stacked.shape[1:], dtype=t_stacked.dtype, device=t_stacked.device)
    collectives.reduce_scatter(out, t_stacked.flatten(0, 1).contiguous(), group=group)
    return out


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    st, group, _ = _cp()
    inputs = [c.contiguous() for c in x.chunk(st.cp_size, dim=scatter_dim)]
    outputs = [torch.empty_like(inputs[0]) for _ in inputs]
    dist.all_to_all(outputs, inputs, group=group)
    return torch.cat(outputs, dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """Forward: split dimension `scatter_dim` over the CP ranks and concatenate what they send along
    `gather_dim`. Backward: the same exchange with the two dimensions swapped."""

    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim):
        ctx.dims = (scatter_dim, gather_dim)
        return _all_to_all(x, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, gather_dim, scatter_dim), None, None


def heads_to_sequence(x_bnsd: torch.Tensor) -> torch.Tensor:
    """Ulysses: [b, n, s, d] (local tokens, all heads) -> [b, n/CP, CP·s, d] (every rank's tokens in
    CP-rank order, this rank's heads)."""
    return x_bnsd if state.get().cp_size == 1 else _AllToAll.apply(x_bnsd, 1, 2)


def sequence_to_heads(x_bnsd: torch.Tensor) -> torch.Tensor:
    """The inverse of heads_to_sequence."""
    return x_bnsd if state.get().cp_size == 1 else _AllToAll.apply(x_bnsd, 2, 1)
