"""The MoE layer: router -> dispatcher -> experts -> combine, plus an optional always-on shared expert.

    y = Σ_{e in top-k(x)} p_e(x) · expert_e(x)  [+ shared(x) · (sigmoid(x · w_gate) with the gate)]

Input and output are x_sbh like the dense MLP's (s = this rank's s/tp tokens under sequence
parallelism; MoE layers with TP > 1 require it, so every rank of a stage holds distinct tokens). The
router is replicated (its gradient summed over TP under sequence parallelism, like a norm's); the
experts are split over EP (and ETP) and flagged `expert_parallel`; the shared expert is a dense
tensor-parallel MLP. The balancing losses ride on the output through the aux-loss scaler.

Statistics for the log line (stats.py) accumulate during training forwards only, once per micro-batch
(not again when activation recompute replays the forward inside backward).
"""
from __future__ import annotations

import torch
from torch import nn

from megaflow.layers.mlp import MLP
from megaflow.layers.moe import aux_loss
from megaflow.layers.moe.dispatcher import TokenDispatcher
from megaflow.layers.moe.experts import Experts
from megaflow.layers.moe.router import TopKRouter
from megaflow.parallel import state


def _first_forward() -> bool:
    """False while autograd replays a forward during backward (activation recompute)."""
    return torch._C._current_graph_task_id() == -1


class MoELayer(nn.Module):
    def __init__(self, cfg, layer_number: int, output_std: float):
        super().__init__()
        e, m, st = cfg.moe, cfg.model, state.get()
        self.layer_number, self.num_experts = layer_number, e.num_experts
        self.router_bias_update_rate = e.moe_router_bias_update_rate
        groups = st.groups
        self.router = TopKRouter(cfg, groups.get("tp"))
        num_local = e.num_experts // st.ep_size
        etp = st.etp_size
        self.experts = Experts(cfg, st.ep_rank * num_local, num_local, etp, output_std)
        # With ETP = TP the expert-TP group is the TP group (parallel/state.py): its ranks gather tokens.
        self.dispatcher = TokenDispatcher(e.num_experts, st.ep_size, st.ep_rank, groups.get("ep"),
                                          groups.get("etp") if etp > 1 else None, e.moe_token_dispatcher_type,
                                          e.moe_expert_capacity_factor, e.moe_token_drop_policy,
                                          e.moe_pad_expert_input_to_capacity)
        self.shared_experts = None
        if e.moe_shared_expert_intermediate_size:
            self.shared_experts = MLP(cfg, output_std, e.moe_shared_expert_intermediate_size)
            if e.moe_shared_expert_gate:
                self.shared_experts.gate_weight = nn.Parameter(torch.empty(1, m.hidden_size, device=st.device))
                self.shared_experts.gate_weight.init_std = m.init_method_std
                self.shared_experts.gate_weight.sequence_parallel = cfg.parallel.sequence_parallel
        self.reset_stats()

    def reset_stats(self) -> None:
        dev = self.router.weight.device
        self.step_counts = torch.zeros(self.num_experts, dtype=torch.float64, device=dev)  # expert bias
        self.reset_stats_window()

    def reset_stats_window(self) -> None:
        """Sums since the last log line: tokens routed per expert, aux and z shares, dropped pairs."""
        dev = self.router.weight.device
        self.stat_counts = torch.zeros(self.num_experts, dtype=torch.float64, device=dev)
        self.stat_scalars = torch.zeros(4, dtype=torch.float64, device=dev)  # aux, z, dropped, pairs
        self.stat_microbatches = 0

    def forward(self, x_sbh):
        y_sbh = self._routed(x_sbh)
        if self.shared_experts is not None:
            shared = self.shared_experts(x_sbh)
            gate = getattr(self.shared_experts, "gate_weight", None)
            if gate is not None:
                shared = shared * torch.sigmoid(x_sbh @ gate.t().to(x_sbh.dtype))
            y_sbh = y_sbh + shared
        return y_sbh

    @torch.compiler.disable  # the routing decides every shape from here on: eager inside --compile
    def _routed(self, x_sbh):
        """The routed experts' output: router, dispatch, experts, combine, statistics."""
        s, b, h = x_sbh.shape
        x_th = x_sbh.reshape(s * b, h)
        routing = self.router(x_th, b)
        y_th = self.dispatcher(x_th, routing.probs_tk.to(x_th.dtype), routing.experts_tk, self.experts)
        if self.training and _first_forward():
            self._record(routing)
        return aux_loss.attach(y_th.view(s, b, h), routing.aux_loss)

    @torch.no_grad()
    def _record(self, routing) -> None:
        counts = routing.counts_e.double()
        self.stat_counts += counts
        self.step_counts += counts
        pairs = self.dispatcher.last_pairs if self.dispatcher.capacity_factor is not None else 0
        self.stat_scalars += torch.tensor([float(routing.aux_value), float(routing.z_value),
                                           float(self.dispatcher.last_dropped), float(pairs)],
                                          dtype=torch.float64, device=self.stat_scalars.device)
        self.stat_microbatches += 1
