"""Token dispatch and combine: the only place MoE communicates.

A routing is a list of (token, expert, weight) pairs: t·k of them when dropless, fewer when a capacity
drops some (capacity_keep_mask), plus weight-0 pairs pointing at a zero row when inputs are padded to
capacity. The dispatcher brings each pair's token row to the rank holding its expert, grouped by local
expert, lets the experts run (experts.py), brings the rows back and sums weight · output per token.

Shapes: t tokens of this rank, h hidden, k top-k, n pairs, E experts, El = E / EP local experts.

Stages, each skipped when its group has one rank:
  1. expert tensor parallelism (ETP = TP): experts are split like the dense MLP, so every TP rank needs
     all tokens of the TP group: all-gather tokens and routing over TP (backward: reduce-scatter, the
     experts' input gradients are partial sums), and at the end reduce-scatter the partial outputs.
  2. expert parallelism over the EP group, either
       alltoall   sort pairs by expert, exchange counts, all-to-all the rows (variable splits), regroup
                  the received blocks (source rank, local expert) by local expert; the way back reverses
                  each step. Traffic: the routed rows only.
       allgather  all-gather every rank's tokens and routing, keep the pairs of local experts, and
                  reduce-scatter the partial outputs. Traffic: all tokens; no count exchange.
Pairs are sorted by (expert, token) everywhere, so the order of every sum is the same at EP = 1.
"""
from __future__ import annotations

import math

import torch

from megaflow.parallel import expert_comm


def capacity(num_tokens: int, topk: int, num_experts: int, factor: float) -> int:
    """Rows each expert accepts: ceil(tokens · k / E · factor) (Megatron-Core's rule)."""
    return int(math.ceil(num_tokens * topk / num_experts * factor))


def capacity_keep_mask(probs_tk, experts_tk, num_experts: int, cap: int, policy: str) -> torch.Tensor:
    """[t, k] bool: the pairs each expert keeps. policy 'probs': its cap highest-weight pairs;
    'position': its first cap pairs in token order (earlier tokens first)."""
    e_n = experts_tk.reshape(-1)
    if policy == "probs":
        by_prob = torch.argsort(-probs_tk.detach().reshape(-1), stable=True)
        order = by_prob[torch.argsort(e_n[by_prob], stable=True)]
    else:
        order = torch.argsort(e_n, stable=True)  # pair index t·k + j: token order within each expert
    counts = torch.bincount(e_n, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(e_n.numel(), device=e_n.device) - starts[e_n[order]]
    keep = torch.zeros_like(e_n, dtype=torch.bool)
    keep[order] = rank_in_expert < cap
    return keep.view_as(experts_tk)


def _inverse(order: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


class _PermuteRows(torch.autograd.Function):
    """x[order]; backward is the gather by the inverse permutation (not index_put's scatter-add)."""

    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, g):
        (inverse,) = ctx.saved_tensors
        return g.index_select(0, inverse), None, None


def permute_rows(x, order, inverse):
    return _PermuteRows.apply(x, order, inverse)


class TokenDispatcher:
    def __init__(self, num_experts: int, ep_size: int, ep_rank: int, ep_group, etp_group, kind: str,
                 capacity_factor=None, drop_policy: str = "probs", pad_to_capacity: bool = False):
        self.num_experts, self.ep_size, self.ep_rank = num_experts, ep_size, ep_rank
        self.num_local = num_experts // ep_size
        self.ep_group, self.etp_group, self.kind = ep_group, etp_group, kind
        self.capacity_factor, self.drop_policy, self.pad = capacity_factor, drop_policy, pad_to_capacity
        self.last_dropped = 0  # pairs dropped by the capacity in the last call (statistics)
        self.last_pairs = 0    # pairs the capacity was applied to

    # -- routing -> pairs ------------------------------------------------------------------------
    def _pairs(self, x_th, probs_tk, experts_tk):
        """(x with a zero row appended when padding, token index, expert, weight) of the kept pairs."""
        t, k = experts_tk.shape
        token_n = torch.arange(t, device=x_th.device).repeat_interleave(k)
        expert_n, weight_n = experts_tk.reshape(-1), probs_tk.reshape(-1)
        self.last_dropped, self.last_pairs = 0, t * k
        if self.capacity_factor is None:
            return x_th, token_n, expert_n, weight_n
        cap = capacity(t, k, self.num_experts, self.capacity_factor)
        keep = capacity_keep_mask(probs_tk, experts_tk, self.num_experts, cap, self.drop_policy).reshape(-1)
        self.last_dropped = int((~keep).sum())
        token_n, expert_n, weight_n = token_n[keep], expert_n[keep], weight_n[keep]
        if self.pad:  # every expert gets exactly `cap` rows: weight-0 pairs on an appended zero row
            missing = cap - torch.bincount(expert_n, minlength=self.num_experts)
            pad_experts = torch.repeat_interleave(torch.arange(self.num_experts, device=x_th.device), missing)
            x_th = torch.cat([x_th, x_th.new_zeros(1, x_th.shape[1])])
            token_n = torch.cat([token_n, torch.full_like(pad_experts, t)])
            expert_n = torch.cat([expert_n, pad_experts])
            weight_n = torch.cat([weight_n, weight_n.new_zeros(pad_experts.numel())])
        return x_th, token_n, expert_n, weight_n

    # -- the whole layer ---------------------------------------------------------------------------
    def __call__(self, x_th, probs_tk, experts_tk, experts):
        """experts(x_nh sorted by local expert, counts per local expert) -> y_nh. Returns y_th."""
        t = x_th.shape[0]
        if expert_comm.group_size(self.etp_group) > 1:
            x_th = expert_comm.gather_along_first(x_th, self.etp_group)
            probs_tk = expert_comm.gather_along_first(probs_tk, self.etp_group)
            experts_tk = expert_comm.all_gather_rows(experts_tk, self.etp_group)
        if self.kind == "allgather" and self.ep_size > 1:
            y_th = self._allgather(x_th, probs_tk, experts_tk, experts)
        else:
            y_th = self._alltoall(x_th, probs_tk, experts_tk, experts)
        if expert_comm.group_size(self.etp_group) > 1:
            y_th = expert_comm.reduce_scatter_along_first(y_th, self.etp_group)
        assert y_th.shape[0] == t
        return y_th

    def _combine(self, y_nh, token_n, weight_n, rows: int):
        """Σ weight · output per token ([rows, h]; padding rows land past the real tokens)."""
        out = y_nh.new_zeros((rows + 1, y_nh.shape[1]))
        out = out.index_add(0, token_n, y_nh * weight_n.to(y_nh.dtype).unsqueeze(1))
        return out[:rows]

    def _alltoall(self, x_th, probs_tk, experts_tk, experts):
        t, k = experts_tk.shape
        if self.capacity_factor is None:
            # Dropless: pair n = t·k + j. Sorting and unsorting are row permutations (gathers both ways,
            # no scatter-add), and the combine a weighted sum over each token's k outputs.
            self.last_dropped, self.last_pairs = 0, t * k
            order = torch.argsort(experts_tk.reshape(-1), stable=True)   # by expert, then token
            inverse = _inverse(order)
            x_pairs = x_th.unsqueeze(1).expand(t, k, x_th.shape[1]).reshape(t * k, x_th.shape[1])
            x_nh = permute_rows(x_pairs, order, inverse)
            y_nh = self._through_experts(x_nh, experts_tk.reshape(-1)[order], experts)
            y_pairs = permute_rows(y_nh, inverse, order).view(t, k, -1)
            return (y_pairs * probs_tk.to(y_pairs.dtype).unsqueeze(-1)).sum(1)
        x_th, token_n, expert_n, weight_n = self._pairs(x_th, probs_tk, experts_tk)
        order = torch.argsort(expert_n, stable=True)               # by expert, then token
        token_n, expert_n, weight_n = token_n[order], expert_n[order], weight_n[order]
        y_nh = self._through_experts(x_th[token_n], expert_n, experts)
        return self._combine(y_nh, token_n, weight_n, t)

    def _through_experts(self, x_nh, expert_n, experts):
        """Rows sorted by (global) expert -> the experts' outputs, same order; over EP when EP > 1."""
        counts_e = torch.bincount(expert_n, minlength=self.num_experts)
        if self.ep_size == 1:
            return experts(x_nh, counts_e.tolist())
        recv = expert_comm.exchange_counts(counts_e, self.ep_group).view(self.ep_size, self.num_local)
        send_splits = counts_e.view(self.ep_size, self.num_local).sum(1).tolist()
        recv_splits = recv.sum(1).tolist()
        x_recv = expert_comm.all_to_all(x_nh, recv_splits, send_splits, self.ep_group)
        # Received blocks come as (source rank, local expert); the experts want (local expert, source).
        block_of_row = torch.repeat_interleave(torch.arange(recv.numel(), device=x_nh.device), recv.reshape(-1))
        src, local = block_of_row // self.num_local, block_of_row % self.num_local
        regroup = torch.argsort(local * self.ep_size + src, stable=True)
        back = _inverse(regroup)
        y_local = experts(permute_rows(x_recv, regroup, back), recv.sum(0).tolist())
        return expert_comm.all_to_all(permute_rows(y_local, back, regroup), send_splits, recv_splits, self.ep_group)

    def _allgather(self, x_th, probs_tk, experts_tk, experts):
        t = x_th.shape[0]
        x_all = expert_comm.gather_along_first(x_th, self.ep_group)
        probs_all = expert_comm.gather_along_first(probs_tk, self.ep_group)
        experts_all = expert_comm.all_gather_rows(experts_tk, self.ep_group)
        # A capacity applies to each EP rank's own tokens, as with alltoall: pairs are built per block.
        xs, tokens, experts_n, weights, dropped = [], [], [], [], 0
        for i, (xb, pb, eb) in enumerate(zip(x_all.chunk(self.ep_size), probs_all.chunk(self.ep_size),
                                             experts_all.chunk(self.ep_size))):
            xp, tok, ex, w = self._pairs(xb, pb, eb)
            dropped = self.last_dropped if i == self.ep_rank else dropped
            tokens.append(tok + sum(x.shape[0] for x in xs))
            xs.append(xp)
            experts_n.append(ex)
            weights.append(w)
        self.last_dropped = dropped
        x_cat = torch.cat(xs)
        token_n, expert_n, weight_n = torch.cat(tokens), torch.cat(experts_n), torch.cat(weights)
        lo = self.ep_rank * self.num_local
        mine = (expert_n >= lo) & (expert_n < lo + self.num_local)
        token_n, expert_n, weight_n = token_n[mine], expert_n[mine], weight_n[mine]
        order = torch.argsort(expert_n, stable=True)               # by expert, then token
        token_n, expert_n, weight_n = token_n[order], expert_n[order], weight_n[order]
        counts = torch.bincount(expert_n - lo, minlength=self.num_local)
        y_nh = experts(x_cat[token_n], counts.tolist())
        out = self._combine(y_nh, token_n, weight_n, x_cat.shape[0])
        if x_cat.shape[0] != x_all.shape[0]:  # drop each block's appended zero row (padding)
            out = torch.cat([o[:t] for o in out.split([x.shape[0] for x in xs])])
        return expert_comm.reduce_scatter_along_first(out, self.ep_group)
