"""Step time of a layout from a FLOP and communication model.

    compute     GEMM FLOPs of a stage's chunk per micro-batch / TP, at `efficiency` × peak; backward 2×
                forward; full recompute adds the layers' forward again, selective the attention core's
    TP          per layer and micro-batch, on the critical path (docs/parallelism.md counts them):
                without SP 4 all-reduces of T = s·b·h·a bytes, with SP 6 all-gathers + 4 reduce-scatters
                of T (an all-reduce is both), full recompute repeats the forward's; ring cost
                (tp−1)/tp·T per all-gather or reduce-scatter at the TP group's bandwidth
    pipeline    (M + (PP − 1)/V) · (F + B) of the slowest stage (the bubble (PP−1)/(V·M+PP−1)), plus
                one activation and one gradient transfer per chunk and micro-batch, not overlapped
    DP          fp32 gradient all-reduce (plain DP, ZeRO-1) or reduce-scatter (ZeRO-2), and with ZeRO
                the parameter all-gather; with --overlap-grad-reduce / --overlap-param-gather only what
                the last backward / first forward cannot hide
    CP          every FLOP and activation of a rank ∝ s/CP (zigzag chunks balance causal attention);
                per layer and micro-batch the attention exchanges K/V: p2p (CP−1) K/V blocks forward,
                (CP−1) K/V + CP fp32 dK/dV blocks backward, hidden behind the attention of the block in
                hand except the part longer than it; a2a 4 all-to-alls of q, k, v, o each way; all_gather
                gathers K/V (forward and again in backward) and reduce-scatters fp32 dK/dV; not hidden.
                DP gradients are reduced over DP×CP.
    EP          MoE token dispatch per MoE layer and micro-batch, not overlapped: alltoall moves the
                (EP−1)/EP of the ts·k routed tokens out and back, forward and backward; allgather gathers
                every EP rank's tokens (balanced load assumed)
    optimizer   memory-bound: the owned elements' bytes read and written once at HBM bandwidth
    overhead    KERNELS_PER_LAYER kernels per layer forward (twice that backward) × kernel_overhead_us per
                micro-batch: what makes tiny micro-batches slow although their FLOPs are the same
Bandwidths are per GPU and per direction: a group inside one node uses the intra-node figure, a group
spanning nodes the inter-node one. Every collective also pays `latency_us`.
"""
from __future__ import annotations

from dataclasses import dataclass

from megaflow.config import Config, num_microbatches, virtual_pipeline_size
from megaflow.planner.memory import DEFAULT_BUCKET_SIZE, _param_bytes, model_state_bytes
from megaflow.planner.params import chunk_flags, head_dim, is_moe_layer, stage_layer_numbers


KERNELS_PER_LAYER = 25  # a transformer layer's forward: norms, GEMMs, attention, RoPE, activation, adds


@dataclass(frozen=True)
class Cluster:
    gpus: int
    gpus_per_node: int = 8
    memory_gib: float = 80.0
    intra_node_gbps: float = 450.0    # GB/s per GPU (NVLink 4 on H100: 450 each way)
    inter_node_gbps: float = 50.0     # GB/s per GPU (one 400 Gb/s NIC per GPU)
    peak_tflops: float = 989.0        # dense bf16 (H100 SXM)
    efficiency: float = 0.55          # fraction of peak a large GEMM reaches in practice
    hbm_gbps: float = 3350.0
    latency_us: float = 20.0
    kernel_overhead_us: float = 5.0   # launch and tail cost per kernel: small micro-batches pay it more often
    reserved_gib: float = 4.0         # CUDA context, allocator fragmentation, workspaces


def _act_bytes(cfg: Config) -> int:
    return 2 if (cfg.training.bf16 or cfg.training.fp16) else 4


def layer_forward_flops(cfg: Config) -> float:
    """Per micro-batch, whole layer (all TP ranks): GEMMs, attention causal at half. With MoE layers or
    multi-latent attention the average layer of training/flops.py (MoE layers counting their active
    experts; multi-token-prediction modules spread over the layers)."""
    m = cfg.model
    h, s, f, d = m.hidden_size, cfg.data.seq_length, m.ffn_hidden_size, head_dim(cfg)
    q, kv = m.num_attention_heads * d, m.num_query_groups * d
    per_token = 2 * h * (q + 2 * kv) + 2 * 2 * s * q * 0.5 + 2 * q * h \
        + 2 * h * f * (2 if m.swiglu else 1) + 2 * f * h
    if cfg.moe.num_experts is not None or m.multi_latent_attention:
        from megaflow.training.flops import forward_flops_per_token
        per_token = (forward_flops_per_token(cfg) - 2 * h * cfg.padded_vocab_size) / m.num_layers
    return per_token * s * cfg.training.micro_batch_size


def attention_core_flops(cfg: Config) -> float:
    s, q = cfg.data.seq_length, cfg.model.num_attention_heads * head_dim(cfg)
    return 2 * 2 * s * q * 0.5 * s * cfg.training.micro_batch_size


def spans_nodes(group_size: int, stride: int, cluster: Cluster) -> bool:
    """Ranks r, r + stride, ... (group_size of them): do they live on more than one node?"""
    return group_size > 1 and (group_size - 1) * stride >= cluster.gpus_per_node


def _bw(cross: bool, cluster: Cluster) -> float:
    return (cluster.inter_node_gbps if cross else cluster.intra_node_gbps) * 1e9


def _ring(kind: str, nbytes: float, n: int, bw: float, latency: float) -> float:
    """Time of one ring collective of a `nbytes` tensor over n ranks."""
    if n <= 1:
        return 0.0
    factor = {"all_reduce": 2.0, "all_gather": 1.0, "reduce_scatter": 1.0}[kind]
    return factor * (n - 1) / n * nbytes / bw + latency


def cp_comm_times(cfg: Config, cluster: Cluster, layers: int) -> tuple[float, float]:
    """(forward, backward) seconds of context-parallel attention communication, one micro-batch."""
    m, p = cfg.model, cfg.parallel
    tp, cp = p.tensor_model_parallel_size, p.context_parallel_size
    if cp == 1:
        return 0.0, 0.0
    bw, lat = _bw(spans_nodes(cp, tp, cluster), cluster), cluster.latency_us * 1e-6
    tokens = cfg.data.seq_length // cp * cfg.training.micro_batch_size
    d, n, g = head_dim(cfg), m.num_attention_heads // tp, m.num_query_groups // tp
    kv = 2 * tokens * g * d * _act_bytes(cfg)
    if p.cp_comm_type == "p2p":
        # One block per ring step, overlapped with that step's attention (1/CP of the layer's core).
        core = attention_core_flops(cfg) / (tp * cp * cp) / (cluster.peak_tflops * 1e12 * cluster.efficiency)
        step = lambda nbytes: max(nbytes / bw + lat - core, lat)  # noqa: E731
        return layers * (cp - 1) * step(kv), layers * ((cp - 1) * step(kv) + cp * step(kv * 4 / _act_bytes(cfg)))
    if p.cp_comm_type == "a2a":
        moved = (cp - 1) / cp * tokens * (2 * n + 2 * g) * d * _act_bytes(cfg)
        return layers * (moved / bw + 4 * lat), layers * (moved / bw + 4 * lat)
    gather = _ring("all_gather", cp * kv, cp, bw, lat)
    return layers * gather, layers * (gather + _ring("reduce_scatter", cp * kv * 4 / _act_bytes(cfg), cp, bw, lat))


def ep_comm_times(cfg: Config, cluster: Cluster, moe_layers: int) -> tuple[float, float]:
    """(forward, backward) seconds of MoE token dispatch for one micro-batch, not overlapped: alltoall
    sends the (EP−1)/EP of its ts·k routed tokens that leave the rank and gets the experts' outputs back
    (forward: dispatch and combine; backward: the same for the gradients); allgather gathers every EP
    rank's tokens and reduce-scatters the outputs. A balanced load is assumed."""
    e, p = cfg.moe, cfg.parallel
    ep = p.expert_model_parallel_size
    if e.num_experts is None or ep == 1 or moe_layers == 0:
        return 0.0, 0.0
    etp = p.expert_tensor_parallel_size or p.tensor_model_parallel_size
    bw, lat = _bw(spans_nodes(ep, etp, cluster), cluster), cluster.latency_us * 1e-6
    tokens = cfg.data.seq_length // p.context_parallel_size * cfg.training.micro_batch_size
    if p.sequence_parallel:
        tokens //= p.tensor_model_parallel_size
    row = cfg.model.hidden_size * _act_bytes(cfg)
    if e.moe_token_dispatcher_type == "alltoall":
        one = (ep - 1) / ep * tokens * e.moe_router_topk * row / bw + lat
    else:
        one = _ring("all_gather", ep * tokens * row, ep, bw, lat)
    return moe_layers * 2 * one, moe_layers * 2 * one


def stage_times(cfg: Config, pp_rank: int, cluster: Cluster) -> dict:
    """Forward and backward time of one micro-batch through all chunks of a stage (seconds)."""
    m, p = cfg.model, cfg.parallel
    tp = p.tensor_model_parallel_size
    cp = p.context_parallel_size  # a rank computes 1/CP of every sequence
    rate = cluster.peak_tflops * 1e12 * cluster.efficiency
    lat = cluster.latency_us * 1e-6
    tp_bw = _bw(spans_nodes(tp, 1, cluster), cluster)
    T = cfg.data.seq_length // cp * cfg.training.micro_batch_size * m.hidden_size * _act_bytes(cfg)
    layers = sum(len(stage_layer_numbers(cfg, pp_rank, v)) for v in range(virtual_pipeline_size(cfg)))
    fwd = layers * layer_forward_flops(cfg) / (tp * cp)
    for v in range(virtual_pipeline_size(cfg)):
        if chunk_flags(cfg, pp_rank, v)[1]:  # logits GEMM on the padded vocabulary
            fwd += 2 * m.hidden_size * cfg.padded_vocab_size * cfg.data.seq_length \
                * cfg.training.micro_batch_size / (tp * cp)
    recompute = 0.0
    if m.recompute_granularity == "full":
        recompute = layers * layer_forward_flops(cfg) / (tp * cp)
    elif m.recompute_granularity == "selective":
        recompute = layers * attention_core_flops(cfg) / (tp * cp)
    if p.sequence_parallel:
        ag, rs = _ring("all_gather", T, tp, tp_bw, lat), _ring("reduce_scatter", T, tp, tp_bw, lat)
        tp_fwd, tp_bwd = layers * 2 * (ag + rs), layers * (4 * ag + 2 * rs)
    else:
        ar = _ring("all_reduce", T, tp, tp_bw, lat)
        tp_fwd, tp_bwd = layers * 2 * ar, layers * 2 * ar
    if m.recompute_granularity == "full":
        tp_bwd += tp_fwd
    launch = layers * KERNELS_PER_LAYER * cluster.kernel_overhead_us * 1e-6
    cp_fwd, cp_bwd = cp_comm_times(cfg, cluster, layers)
    moe_layers = sum(is_moe_layer(cfg, n) for v in range(virtual_pipeline_size(cfg))
                     for n in stage_layer_numbers(cfg, pp_rank, v))
    ep_fwd, ep_bwd = ep_comm_times(cfg, cluster, moe_layers)
    if m.recompute_granularity == "full":
        cp_bwd += cp_fwd
        ep_bwd += ep_fwd
    return {"forward": fwd / rate + tp_fwd + cp_fwd + ep_fwd + launch,
            "backward": (2 * fwd + recompute) / rate + tp_bwd + cp_bwd + ep_bwd
            + launch * (3 if m.recompute_granularity == "full" else 2),
            "compute": (3 * fwd + recompute) / rate, "tp_comm": tp_fwd + tp_bwd, "cp_comm": cp_fwd + cp_bwd,
            "ep_comm": ep_fwd + ep_bwd}


def step_time(cfg: Config, cluster: Cluster) -> dict:
    """Predicted seconds per optimizer step, with its parts."""
    p = cfg.parallel
    tp, pp, dp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, cfg.data_parallel_size
    vs, mbs = virtual_pipeline_size(cfg), num_microbatches(cfg)
    lat = cluster.latency_us * 1e-6
    stages = [stage_times(cfg, r, cluster) for r in range(pp)]
    slowest = max(stages, key=lambda s: s["forward"] + s["backward"])
    fb = slowest["forward"] + slowest["backward"]
    pipeline = (mbs + (pp - 1) / vs) * fb
    p2p = 0.0
    if pp > 1:
        s = cfg.data.seq_length // p.context_parallel_size // (tp if p.sequence_parallel else 1)
        msg = s * cfg.training.micro_batch_size * cfg.model.hidden_size * _act_bytes(cfg)
        stride = tp * p.context_parallel_size * dp
        p2p = (mbs * vs + pp - 1) * 2 * (msg / _bw(spans_nodes(pp, stride, cluster), cluster) + lat)
    # Data parallelism: the stage with most parameters decides.
    states = [model_state_bytes(cfg, r) for r in range(pp)]
    grad_bytes = max(s["gradients"] for s in states)
    param_bytes = max(s["parameters"] for s in states)
    dp = dp * p.context_parallel_size  # dense gradients are reduced (and ZeRO-sharded) over DP×CP
    dp_bw = _bw(spans_nodes(dp, tp, cluster), cluster)
    zero = getattr(p, "zero_stage", 1) if p.use_distributed_optimizer else 0
    if zero >= 2:  # the states hold shards: the traffic is the full buffers'
        grad_bytes = max(s["full_parameters"] // _param_bytes(cfg) * 4 for s in states)
        param_bytes = max(s["full_parameters"] for s in states)
    n_buckets = max(1, -(-grad_bytes // 4 // (getattr(p, "ddp_bucket_size", None) or DEFAULT_BUCKET_SIZE)))
    if zero == 3:
        n_buckets = cfg.model.num_layers // pp + 1  # one per layer and one for the rest of the stage
    rounds = mbs if zero >= 2 else 1  # ZeRO-2/3 reduce-scatter every micro-batch
    grad_comm = rounds * _ring("reduce_scatter" if zero else "all_reduce", grad_bytes, dp, dp_bw, lat * n_buckets)
    # ZeRO-3 gathers the parameters before every micro-batch's forward and again before its backward
    gathers = 2 * mbs if zero == 3 else 1
    param_comm = gathers * _ring("all_gather", param_bytes, dp, dp_bw, lat * n_buckets) if zero else 0.0
    if p.overlap_grad_reduce or zero >= 2:  # ZeRO-2/3 always reduce from the gradient hooks
        grad_comm = max(grad_comm - slowest["backward"], grad_comm / n_buckets)
    if zero == 3:  # prefetched while the previous layer computes, forward and backward
        param_comm = max(param_comm - mbs * (slowest["forward"] + slowest["backward"]), param_comm / n_buckets)
    elif p.overlap_param_gather and zero:
        param_comm = max(param_comm - slowest["forward"], param_comm / n_buckets)
    owned = max(s["owned_elements"] for s in states)
    optimizer = owned * 2 * (4 + 8 + 4 + (4 if states[0]["main_params"] else 0)) / (cluster.hbm_gbps * 1e9)
    total = pipeline + p2p + grad_comm + param_comm + optimizer
    bubble = (pp - 1) / (vs * mbs + pp - 1) if pp > 1 else 0.0
    return {"step": total, "pipeline": pipeline, "bubble_fraction": bubble, "p2p": p2p,
            "dp_grad": grad_comm, "dp_param": param_comm, "optimizer": optimizer,
            "tp_comm": slowest["tp_comm"] * mbs, "cp_comm": slowest["cp_comm"] * mbs,
            "ep_comm": slowest["ep_comm"] * mbs,
            "compute": slowest["compute"] * mbs}
