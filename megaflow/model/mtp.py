"""Multi-token prediction (DeepSeek-V3 §2.2; Megatron-Core's MultiTokenPredictionBlock), --mtp-num-layers D.

On the last pipeline stage, after the main model's layers (hidden h⁰, before the final norm), module
k = 1..D predicts the token k+1 positions ahead, chained on the previous module's hidden state:

    h'ᵏᵢ = W_k [norm(Emb(t_{i+k})) ; norm(hᵏ⁻¹ᵢ)]           eh_proj: 2h -> h
    hᵏ   = TransformerLayer_k(h'ᵏ)                            same block as the model's last layer
    Lₖ   = mean over i with t_{i+k+1} in the sequence of CE(Out(norm_k(hᵏᵢ)), t_{i+k+1})

with the model's own embedding Emb and output layer Out. The embedding comes first in eh_proj's input,
as in Megatron-Core and DeepSeek-V3's released weights (enorm, then hnorm; the paper's equation writes
the two the other way round), so their eh_proj weights load as they are. The training loss gains
λ / D · Σₖ Lₖ (λ = --mtp-loss-scaling-factor), added through the MoE aux-loss scaler
(layers/moe/aux_loss.py): the pipeline schedules still carry one loss per micro-batch. The last stage
has the labels, t_{i+1}, so t_{i+k} is the labels shifted by k−1 and the targets by k; positions whose
target falls off the sequence (or is masked) do not count.

Each module records its loss per micro-batch; training/mtp_stats.py sums them over the job for the log line.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from megaflow.layers import ReplicatedLinear, build_norm
from megaflow.layers.moe import aux_loss


def shift_left(t_bs: torch.Tensor, k: int, fill=0) -> torch.Tensor:
    """t[:, i + k] at position i; `fill` past the end."""
    if k == 0:
        return t_bs
    return torch.cat([t_bs[:, k:], t_bs.new_full((t_bs.shape[0], k), fill)], dim=1)


class MTPLayer(nn.Module):
    def __init__(self, cfg, layer_number: int, output_std: float):
        super().__init__()
        from megaflow.model.gpt import TransformerLayer  # the same block the model is made of
        m, sp = cfg.model, cfg.parallel.sequence_parallel and cfg.parallel.tensor_model_parallel_size > 1
        h = m.hidden_size
        self.enorm = build_norm(m.normalization, h, m.norm_epsilon, m.norm_backend, sp)
        self.hnorm = build_norm(m.normalization, h, m.norm_epsilon, m.norm_backend, sp)
        # Small next to the layer: replicated over TP, each rank projects its own tokens (SP) or all.
        self.eh_proj = ReplicatedLinear(2 * h, h, sequence_parallel=sp, init_std=m.init_method_std)
        self.layer = TransformerLayer(cfg, layer_number)
        self.final_norm = build_norm(m.normalization, h, m.norm_epsilon, m.norm_backend, sp)

    def forward(self, hidden_sbh, embedded_sbh, context=None):
        x_sbh = self.eh_proj(torch.cat([self.enorm(embedded_sbh), self.hnorm(hidden_sbh)], dim=-1))
        return self.layer(x_sbh, None, context)


class MultiTokenPrediction(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        m = cfg.model
        output_std = m.init_method_std / math.sqrt(2.0 * m.num_layers)
        self.layers = nn.ModuleList(MTPLayer(cfg, m.num_layers + k, output_std) for k in range(m.mtp_num_layers))
        self.loss_weight = m.mtp_loss_scaling_factor / m.mtp_num_layers
        self.reset_stats()

    def reset_stats(self) -> None:
        self.stat_losses = None   # summed per module over micro-batches, on the model's device (no sync)
        self.stat_microbatches = 0

    def attach_loss(self, loss_bs, hidden_sbh, labels_bs, loss_mask_bs, embed, logits_of, lm_loss, context=None):
        """loss_bs (the main per-token loss) with the MTP losses attached for backward. embed(ids_sb) ->
        [s(/tp), b, h] and logits_of(x_sbh) -> this rank's logits are the model's own."""
        total, losses = None, []
        for k, layer in enumerate(self.layers, start=1):
            ids_sb = shift_left(labels_bs, k - 1).t()
            mask_bs = shift_left(loss_mask_bs.to(torch.float32), k)
            hidden_sbh = layer(hidden_sbh, embed(ids_sb), context)
            token_loss_sb = lm_loss(logits_of(layer.final_norm(hidden_sbh)), shift_left(labels_bs, k).t())
            mean = (token_loss_sb.t() * mask_bs).sum() / mask_bs.sum().clamp(min=1.0)
            total = mean if total is None else total + mean
            losses.append(mean.detach())
        step = torch.stack(losses).double()
        self.stat_losses = step if self.stat_losses is None else self.stat_losses + step
        self.stat_microbatches += 1
        return aux_loss.attach(loss_bs, total * self.loss_weight)
