"""Mixture of Experts: which layers route, how the router scores and balances, how tokens are dispatched
(Megatron-LM's flag names). The expert-parallel layout flags (--expert-model-parallel-size,
--expert-tensor-parallel-size) live with the other layout flags in parallel.py."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from megaflow.config.fields import ConfigError, _f


@dataclass
class MoEConfig:
    num_experts: Optional[int] = _f(None, "experts per MoE layer (unset: a dense model)")
    moe_ffn_hidden_size: Optional[int] = _f(None, "width of each expert's MLP (default --ffn-hidden-size)")
    moe_layer_freq: str = _f("1", "which layers are MoE: an int k (every k-th layer, starting with layer 0) "
                                  "or a per-layer 0/1 list such as '([0]*1+[1]*3)' or '[0,1,1,1]'")
    moe_router_topk: int = _f(2, "experts per token")
    moe_router_score_function: str = _f("softmax", "router scores", choices=["softmax", "sigmoid"])
    moe_router_pre_softmax: bool = _f(False, "softmax: weight the chosen experts by their probability among "
                                             "all experts (no renormalisation over the top k, as Qwen2-MoE)",
                                      action="store_true")
    moe_router_topk_scaling_factor: Optional[float] = _f(None, "multiply the top-k weights by this")
    moe_router_load_balancing_type: str = _f("aux_loss", "balancing loss",
                                             choices=["aux_loss", "seq_aux_loss", "none"])
    moe_aux_loss_coeff: float = _f(0.0, "coefficient of the load-balancing loss (0: none)")
    moe_z_loss_coeff: Optional[float] = _f(None, "coefficient of the router z-loss")
    moe_router_enable_expert_bias: bool = _f(False, "aux-loss-free balancing: a per-expert bias added to the "
                                                    "scores for the top-k choice only (DeepSeek-V3)",
                                             action="store_true")
    moe_router_bias_update_rate: float = _f(1e-3, "expert-bias step per iteration, toward equal loads")
    moe_router_num_groups: Optional[int] = _f(None, "group-limited routing: experts form this many groups")
    moe_router_group_topk: Optional[int] = _f(None, "group-limited routing: groups a token may use")
    moe_expert_capacity_factor: Optional[float] = _f(None, "expert capacity = factor × tokens × topk / experts; "
                                                           "tokens over capacity are dropped (unset: dropless)")
    moe_token_drop_policy: str = _f("probs", "which tokens an expert over capacity keeps",
                                    choices=["probs", "position"])
    moe_pad_expert_input_to_capacity: bool = _f(False, "pad each expert's input to its capacity (static "
                                                       "shapes)", action="store_true")
    moe_token_dispatcher_type: str = _f("alltoall", "how tokens reach experts on other EP ranks",
                                        choices=["alltoall", "allgather"])
    moe_grouped_gemm: bool = _f(False, "run all local experts as one grouped GEMM (kernels/grouped_gemm.py)",
                                action="store_true")
    moe_grouped_gemm_backend: str = _f("auto", "grouped GEMM kernel", choices=["auto", "torch", "triton"])
    moe_shared_expert_intermediate_size: Optional[int] = _f(None, "width of an always-on shared expert")
    moe_shared_expert_gate: bool = _f(False, "scale the shared expert by sigmoid(x·w) (Qwen2-MoE)",
                                      action="store_true")


def parse_layer_freq(freq: str, num_layers: int) -> list[int]:
    """--moe-layer-freq -> one 0/1 per layer. 'k' marks every k-th layer (0, k, 2k...), as Megatron-LM;
    a list pattern ('([0]*1+[1]*3)', '[0,1,1,1]') gives each layer, and must have num_layers entries."""
    text = str(freq).strip()
    if re.fullmatch(r"\d+", text):
        k = int(text)
        if k < 1:
            raise ConfigError(f"--moe-layer-freq {text}: an integer frequency must be at least 1")
        return [1 if i % k == 0 else 0 for i in range(num_layers)]
    if not re.fullmatch(r"[\[\]\(\)\s\d,*+]+", text):
        raise ConfigError(f"--moe-layer-freq {text!r}: expected an integer or a list such as '([0]*1+[1]*3)'")
    try:
        pattern = eval(text, {"__builtins__": {}}, {})  # only digits, brackets, commas, * and + reach here
    except Exception:
        raise ConfigError(f"--moe-layer-freq {text!r} is not a valid list expression") from None
    pattern = list(pattern) if isinstance(pattern, (list, tuple)) else None
    if pattern is None or any(v not in (0, 1) for v in pattern):
        raise ConfigError(f"--moe-layer-freq {text!r}: the list must hold only 0 and 1")
    if len(pattern) != num_layers:
        raise ConfigError(f"--moe-layer-freq {text!r} has {len(pattern)} entries, --num-layers is {num_layers}")
    return pattern


def validate_moe(cfg, need) -> None:
    """MoE checks (called from config/validation.py); fills moe_ffn_hidden_size."""
    e, m, p = cfg.moe, cfg.model, cfg.parallel
    ep, tp = p.expert_model_parallel_size, p.tensor_model_parallel_size
    etp = p.expert_tensor_parallel_size or tp
    if e.num_experts is None:
        need(ep == 1, "--expert-model-parallel-size > 1 needs --num-experts")
        return
    need(e.num_experts >= 1, "--num-experts must be positive")
    if e.moe_ffn_hidden_size is None:
        e.moe_ffn_hidden_size = m.ffn_hidden_size
    parse_layer_freq(e.moe_layer_freq, m.num_layers)
    need(1 <= e.moe_router_topk <= e.num_experts,
         f"--moe-router-topk ({e.moe_router_topk}) must be between 1 and --num-experts ({e.num_experts})")
    need(e.num_experts % ep == 0,
         f"--num-experts ({e.num_experts}) must be divisible by --expert-model-parallel-size ({ep})")
    need(etp in (1, tp), f"--expert-tensor-parallel-size ({etp}) must be 1 or --tensor-model-parallel-size ({tp})")
    need(e.moe_ffn_hidden_size % etp == 0,
         f"--moe-ffn-hidden-size ({e.moe_ffn_hidden_size}) must be divisible by --expert-tensor-parallel-size ({etp})")
    need(tp == 1 or p.sequence_parallel,
         "MoE layers with --tensor-model-parallel-size > 1 need --sequence-parallel (each TP rank routes its "
         "own tokens, as in Megatron-LM)")
    need(e.moe_aux_loss_coeff >= 0 and (e.moe_z_loss_coeff or 0) >= 0, "--moe-aux-loss-coeff and "
         "--moe-z-loss-coeff must be non-negative")
    if e.moe_router_num_groups is not None or e.moe_router_group_topk is not None:
        g, k = e.moe_router_num_groups, e.moe_router_group_topk
        need(g is not None and k is not None, "--moe-router-num-groups and --moe-router-group-topk go together")
        need(g >= 1 and e.num_experts % g == 0,
             f"--moe-router-num-groups ({g}) must divide --num-experts ({e.num_experts})")
        need(1 <= k <= g, f"--moe-router-group-topk ({k}) must be between 1 and --moe-router-num-groups ({g})")
        need(e.moe_router_topk % k == 0 and e.moe_router_topk // k <= e.num_experts // g,
             f"--moe-router-topk ({e.moe_router_topk}) must be a multiple of --moe-router-group-topk ({k}), at "
             f"most {e.num_experts // g} experts per group")
    need(not e.moe_router_pre_softmax or e.moe_router_score_function == "softmax",
         "--moe-router-pre-softmax needs --moe-router-score-function softmax")
    need(e.moe_expert_capacity_factor is None or e.moe_expert_capacity_factor > 0,
         "--moe-expert-capacity-factor must be positive")
    need(not e.moe_pad_expert_input_to_capacity or e.moe_expert_capacity_factor is not None,
         "--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor")
    need(e.moe_router_bias_update_rate >= 0, "--moe-router-bias-update-rate must be non-negative")
    need(e.moe_shared_expert_intermediate_size is None or e.moe_shared_expert_intermediate_size % tp == 0,
         f"--moe-shared-expert-intermediate-size must be divisible by --tensor-model-parallel-size ({tp})")
    need(not e.moe_shared_expert_gate or e.moe_shared_expert_intermediate_size is not None,
         "--moe-shared-expert-gate needs --moe-shared-expert-intermediate-size")
