"""Top-k router: scores, the top-k choice (optionally group-limited, optionally biased), the balancing
losses. Runs in fp32 whatever the model dtype.

Shapes: t tokens of this rank (s·b, sequence-major: token i belongs to sequence i % b), e experts, k top-k.

Balancing losses are computed for the whole micro-batch whatever the layout: under sequence parallelism
each TP rank routes s/tp of the tokens, so the token counts per expert are summed over TP, and each
rank's loss is its tokens' *share* of the micro-batch loss (both losses are linear in the per-token
terms once the counts are known). The shares add up to the single-process value, and each share's
gradient reaches exactly the router outputs of its own tokens. The losses enter backward through the
aux-loss scaler (aux_loss.py), not through the pipeline's loss.

    aux_loss      coeff · e / (T² k) · Σ_e P_e · c_e   P_e = Σ_tokens score(e) (all experts' scores,
                                                       normalised to sum 1 per token), c_e = tokens routed
                                                       to e, T = tokens of the micro-batch (Switch/GShard)
    seq_aux_loss  the same per sequence (T = its length), averaged over the sequences
    z-loss        coeff · mean_tokens logsumexp(logits)²  (ST-MoE)

Expert bias (aux-loss-free balancing, DeepSeek-V3): a per-expert bias added to the scores for the top-k
choice only; the weights stay the unbiased scores. The trainer nudges it after each step toward equal
loads (layers/moe/stats.py); it is a frozen parameter so checkpoints carry it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megaflow.parallel import expert_comm, state


@dataclass
class Routing:
    probs_tk: torch.Tensor            # weight of each chosen expert (fp32, differentiable)
    experts_tk: torch.Tensor          # chosen expert ids (int64)
    aux_loss: Optional[torch.Tensor]  # this rank's share of the balancing + z losses (scalar, fp32)
    aux_value: float = 0.0            # this rank's share of the balancing loss alone (for logging)
    z_value: float = 0.0              # this rank's share of the z-loss alone (for logging)
    counts_e: Optional[torch.Tensor] = None  # tokens routed to each expert, this rank (no grad)


def topk_choice(scores_te: torch.Tensor, k: int, num_groups: Optional[int], group_topk: Optional[int]):
    """Indices [t, k] of the k highest scores; with group-limited routing only among the experts of the
    group_topk groups whose best k/group_topk scores sum highest (DeepSeek-V3's node-limited routing)."""
    if num_groups is None:
        return scores_te.topk(k, dim=-1).indices
    t, e = scores_te.shape
    grouped = scores_te.view(t, num_groups, e // num_groups)
    group_scores = grouped.topk(k // group_topk, dim=-1).values.sum(-1)           # [t, groups]
    keep_groups = group_scores.topk(group_topk, dim=-1).indices
    mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep_groups, True)
    masked = scores_te.masked_fill(~mask.repeat_interleave(e // num_groups, dim=1), float("-inf"))
    return masked.topk(k, dim=-1).indices


class TopKRouter(nn.Module):
    def __init__(self, cfg, tp_group=None):
        super().__init__()
        e, m = cfg.moe, cfg.model
        self.num_experts, self.topk = e.num_experts, e.moe_router_topk
        self.score_function, self.pre_softmax = e.moe_router_score_function, e.moe_router_pre_softmax
        self.scaling = e.moe_router_topk_scaling_factor
        self.balancing = e.moe_router_load_balancing_type
        self.aux_coeff, self.z_coeff = e.moe_aux_loss_coeff, e.moe_z_loss_coeff or 0.0
        self.num_groups, self.group_topk = e.moe_router_num_groups, e.moe_router_group_topk
        self.sequence_parallel = cfg.parallel.sequence_parallel
        self.tp_group = tp_group if self.sequence_parallel else None  # ranks holding other tokens
        self.tp_size = state.get().tp_size if self.sequence_parallel else 1
        dev = state.get().device
        self.weight = nn.Parameter(torch.empty(e.num_experts, m.hidden_size, device=dev))
        self.weight.init_std = m.init_method_std
        # Replicated over TP; under sequence parallelism each rank sees its own tokens: summed over TP.
        self.weight.sequence_parallel = self.sequence_parallel
        self.expert_bias = None
        if e.moe_router_enable_expert_bias:
            self.expert_bias = nn.Parameter(torch.zeros(e.num_experts, device=dev), requires_grad=False)

    def forward(self, x_th: torch.Tensor, num_sequences: int) -> Routing:
        with torch.autocast(device_type=x_th.device.type, enabled=False):
            logits_te = F.linear(x_th.float(), self.weight.float())
            return self._route(logits_te, num_sequences)

    def _route(self, logits_te, b: int) -> Routing:
        k = self.topk
        if self.score_function == "softmax":
            scores_te = logits_te.softmax(dim=-1)
        else:
            scores_te = logits_te.sigmoid()
        choice_te = scores_te if self.expert_bias is None else scores_te + self.expert_bias.float()
        experts_tk = topk_choice(choice_te.detach(), k, self.num_groups, self.group_topk)
        probs_tk = scores_te.gather(1, experts_tk)
        if self.score_function == "softmax" and not self.pre_softmax:
            probs_tk = probs_tk / probs_tk.sum(-1, keepdim=True)  # = softmax over the chosen logits
        elif self.score_function == "sigmoid" and k > 1:
            probs_tk = probs_tk / (probs_tk.sum(-1, keepdim=True) + 1e-20)
        if self.scaling is not None:
            probs_tk = probs_tk * self.scaling
        counts_e = torch.bincount(experts_tk.reshape(-1), minlength=self.num_experts)
        aux = self._losses(logits_te, scores_te, experts_tk, b)
        return Routing(probs_tk, experts_tk, aux[0], aux[1], aux[2], counts_e)

    def _losses(self, logits_te, scores_te, experts_tk, b: int):
        """(this rank's share of balancing + z loss or None, balancing share, z share)."""
        total, aux_value, z_value = None, 0.0, 0.0
        t_local, e, k = logits_te.shape[0], self.num_experts, self.topk
        if self.balancing != "none" and self.aux_coeff > 0:
            # Each token's distribution over all experts (sigmoid scores normalised like softmax ones).
            dist_te = scores_te if self.score_function == "softmax" else \
                scores_te / (scores_te.sum(-1, keepdim=True) + 1e-20)
            if self.balancing == "aux_loss":
                counts = torch.bincount(experts_tk.reshape(-1), minlength=e).float()
                counts = expert_comm.all_reduce_sum(counts, self.tp_group)
                tokens = t_local * self.tp_size
                aux = (dist_te.sum(0) * counts).sum() * (self.aux_coeff * e / (tokens * tokens * k))
            else:  # per sequence: token i is in sequence i % b
                seq_of = torch.arange(t_local, device=logits_te.device) % b
                onehot = torch.zeros(t_local, e, device=logits_te.device).scatter_(1, experts_tk, 1.0)
                counts_be = torch.zeros(b, e, device=logits_te.device).index_add_(0, seq_of, onehot)
                counts_be = expert_comm.all_reduce_sum(counts_be, self.tp_group)
                probs_be = torch.zeros(b, e, device=logits_te.device).index_add(0, seq_of, dist_te)
                s = (t_local // b) * self.tp_size
                aux = (probs_be * counts_be).sum() * (self.aux_coeff * e / (s * s * k * b))
            total, aux_value = aux, aux.detach()
        if self.z_coeff > 0:
            z = torch.logsumexp(logits_te, dim=-1).square().sum() * (self.z_coeff / (t_local * self.tp_size))
            total = z if total is None else total + z
            z_value = z.detach()
        return total, aux_value, z_value
