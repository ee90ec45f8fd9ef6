"""Per-step MoE bookkeeping outside the layers' forward: the expert-bias update after each step, and
the statistics of the log line (tokens per expert, load imbalance, aux and z losses, dropped pairs).

Every rank of a pipeline stage routes distinct tokens (MoE with TP > 1 needs sequence parallelism), so
counts add up over the stage's TP and DP ranks. Collectives go through torch.distributed groups from
parallel/state.py."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megaflow.parallel import expert_comm, state


def moe_layers(model) -> list:
    """The MoE layers of a model or of every chunk of an interleaved one, in layer order."""
    from megaflow.layers.moe.moe_layer import MoELayer
    chunks = list(model) if isinstance(model, (list, tuple, nn.ModuleList)) else [model]
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, MoELayer)]


@torch.no_grad()
def update_expert_biases(model) -> None:
    """After a step: bias_e += rate · sign(mean load − load_e), loads summed over the step's
    micro-batches and the stage's TP and DP ranks (DeepSeek-V3's aux-loss-free balancing)."""
    layers = [m for m in moe_layers(model) if m.router.expert_bias is not None]
    if not layers:
        return
    st = state.get()
    loads = torch.stack([m.step_counts for m in layers])            # [layers, experts]
    expert_comm.all_reduce_sum(loads, st.groups.get("tp"))
    expert_comm.all_reduce_sum(loads, st.groups.get("dp_cp", st.groups.get("dp")))
    for m, load in zip(layers, loads):
        rate = m.router_bias_update_rate
        m.router.expert_bias.add_((torch.sign(load.mean() - load) * rate).to(m.router.expert_bias.dtype))
        m.step_counts.zero_()


def clear_step_counts(model) -> None:
    for m in moe_layers(model):
        m.step_counts.zero_()


@torch.no_grad()
def collect_stats(model, cfg) -> dict | None:
    """Statistics since the last call, summed over every rank (a collective on all ranks), then reset.
    None for a dense model. Per layer: tokens per expert, imbalance = max/mean load, aux and z loss
    per micro-batch, dropped fraction (with a capacity)."""
    if cfg.moe.num_experts is None:
        return None
    st = state.get()
    n, e = cfg.model.num_layers + (cfg.model.mtp_num_layers or 0), cfg.moe.num_experts  # + MTP layers
    table = torch.zeros(n, e + 5, dtype=torch.float64, device=st.device)
    for m in moe_layers(model):
        row = table[m.layer_number]
        row[:e] += m.stat_counts
        row[e:e + 4] += m.stat_scalars
        # A micro-batch's aux/z shares are split over TP ranks; count micro-batches once per TP group.
        row[e + 4] += m.stat_microbatches if st.tp_rank == 0 else 0
        m.reset_stats_window()
    if dist.is_initialized() and st.world_size > 1:
        dist.all_reduce(table)
    layers = {}
    for i in range(n):
        row = table[i]
        if row[e + 4] == 0:
            continue
        counts, mbs = row[:e], row[e + 4].item()
        mean = counts.mean().item()
        layers[i] = {"tokens_per_expert": counts.tolist(),
                     "load_imbalance": counts.max().item() / mean if mean > 0 else 0.0,
                     "aux_loss": row[e].item() / mbs, "z_loss": row[e + 1].item() / mbs,
                     "dropped_fraction": row[e + 2].item() / row[e + 3].item() if row[e + 3] > 0 else None}
    if not layers:
        return None
    return {"layers": layers,
            "aux_loss": sum(v["aux_loss"] for v in layers.values()),
            "z_loss": sum(v["z_loss"] for v in layers.values()),
            "load_imbalance": max(v["load_imbalance"] for v in layers.values()),
            "dropped_fraction": (None if cfg.moe.moe_expert_capacity_factor is None else
                                 sum(v["dropped_fraction"] or 0.0 for v in layers.values()) / len(layers))}
