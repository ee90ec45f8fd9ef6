"""The multi-token-prediction losses of the log line: each module's mean loss per micro-batch since the
last log line, over the job (model/mtp.py records them)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megaflow.model.mtp import MultiTokenPrediction
from megaflow.parallel import state


def mtp_modules(model) -> list:
    chunks = list(model) if isinstance(model, (list, tuple, nn.ModuleList)) else [model]
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, MultiTokenPrediction)]


@torch.no_grad()
def collect_stats(model, cfg) -> list | None:
    """Each module's mean loss per micro-batch since the last call, over the job (a collective on all
    ranks; every TP rank computes the same loss, so TP rank 0 counts), then reset. None without MTP."""
    d = cfg.model.mtp_num_layers
    if not d:
        return None
    st = state.get()
    table = torch.zeros(d + 1, dtype=torch.float64, device=st.device)
    for m in mtp_modules(model):
        if st.tp_rank == 0 and m.stat_losses is not None:
            table[:d] += m.stat_losses
            table[d] += m.stat_microbatches
        m.reset_stats()
    if dist.is_initialized() and st.world_size > 1:
        dist.all_reduce(table)
    if table[d] == 0:
        return None
    return (table[:d] / table[d]).tolist()
