"""Activation memory: the bytes autograd keeps for backward, per micro-batch and at a stage's peak.

Derived from what the code saves (model/gpt.py, layers/, kernels/), op by op, for two kernel sets:
"cpu" (the torch paths: F.layer_norm / F.rms_norm, F.scaled_dot_product_attention, torch SwiGLU and
cross entropy; dropout keeps a noise tensor of its input's dtype) and "cuda" (the Triton kernels "auto"
selects on GPUs: fused norms saving input + fp32 statistics, flash attention regenerating its dropout
mask, SwiGLU saving its input, cross entropy saving the logits; torch's fused dropout keeps a 1-byte
mask). The "cpu" set is checked against measurements (tests/unit/test_planner.py,
tests/distributed/test_planner_layouts.py).

Legend: t = s·b tokens of a micro-batch, ts = t/tp under sequence parallelism (else t), n and g the
attention heads and query groups on a TP rank, d head dim, f ffn/tp, V' = padded vocabulary/tp,
a = bytes of a GEMM output (2 with --bf16/--fp16, else 4), r = bytes of the residual stream (4 when
--bf16/--fp16 is autocast over fp32 parameters, else a). Under autocast every F.linear also keeps the
16-bit copy of its weight (2 bytes per element) and a 16-bit copy of an fp32 input.

Per transformer layer:
    norms (2)     LayerNorm: x r·ts·h + mean, rstd 4·ts each | RMSNorm cpu: x, x̂ r·ts·h each + rstd 4·ts
                  (CPU autocast runs it in fp32: a 16-bit x is cast and x, x̂ are 4 bytes) | cuda: x + mean,
                  rstd fp32
    GEMM inputs   QKV and SwiGLU FC1 (their blocks run in layers/linear.py's own Function): the norm's
                  output as produced, r·ts·h (the local shard under SP); a GeLU
                  FC1 (F.linear): a·ts·h, or r·ts·h under SP; projection and FC2 inputs are the
                  attention output and the MLP product below
    attention     flash (cuda always; cpu without attention dropout): q, k, v from the QKV blocks (with
                  RoPE only v a·t·g·d stays, RoPE saves nothing of its input; without, all three
                  a·t·(n+2g)·d), RoPE outputs a·t·(n+g)·d, the output a·t·n·d (the projection's input
                  is a view of it), logsumexp 4·b·n·s
                  math (cpu with attention dropout, fp32 inside): scaled q, k and v expanded to n heads
                  3·4·t·n·d, probabilities, dropout noise and dropped probabilities 3·4·b·n·s², and the
                  projection's input a·t·n·d
    dropout (2)   on the projection / FC2 output (+ bias): cpu its dtype · ts·h, cuda ts·h
    MLP           GeLU: fc1 output + GeLU output 2·a·t·f | SwiGLU cpu: gate, up 2·a·t·f + silu(gate) +
                  product 2·a·t·f | cuda: gate, up + product 3·a·t·f
MoE layers: the router's scores, choices and weights; the ts·k routed tokens in the GEMM dtype (a
balanced load: every expert rank computes ts·k of them; with a capacity C per expert, min(ts·k, E·C), or
E·C when padded to it), each expert's MLP over them, the experts'
weights in the GEMM dtype when grouped or autocast; the combine's indices, weights and outputs; a shared
expert as a dense MLP (its gate: the fp32 output, gate and logit). Multi-latent attention and
multi-token prediction: _mla_attention, mtp_terms.
Context parallelism (CP) and packed documents: every figure above is per rank, so s is the sequence
length / CP (this rank's zigzag chunks). Their attention (layers/context_attention.py) keeps q, k, v
(a2a: after the all-to-all, kv heads repeated to n when g is not a multiple of CP), the fp32 output
accumulator 4·t·n·d and LSE 4·b·n·s, and the projection's input a·t·n·d; with positions other than
0..s−1 (CP, --reset-position-ids) the fp32 RoPE tables are built per micro-batch from the position ids
(2·4·s·d, or per sample when positions differ between samples).
Recompute: selective checkpoints core attention (its inputs q, k, v stay: the QKV output and the RoPE
outputs); its internals come back during its backward. Full checkpoints chunks of layers: only each
chunk's input stays; one chunk's activations come back during its backward.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from megaflow.config import Config, num_microbatches, virtual_pipeline_size
from megaflow.layers.moe.dispatcher import capacity
from megaflow.model.attention import rotary_dim
from megaflow.planner.params import chunk_flags, head_dim, is_moe_layer, stage_layer_numbers

DEVICES = ("cpu", "cuda")


@dataclass
class Segment:
    """A piece of a chunk's forward: `saved` bytes stay until its backward; during its backward
    `extra` bytes more are alive (activations recomputed there)."""
    name: str
    saved: float
    extra: float = 0.0
    terms: dict = field(default_factory=dict)


def _dims(cfg: Config):
    m, p = cfg.model, cfg.parallel
    tp, cp = p.tensor_model_parallel_size, p.context_parallel_size
    s, b = cfg.data.seq_length // cp, cfg.training.micro_batch_size
    t = s * b
    ts = t // tp if p.sequence_parallel else t
    half = cfg.training.bf16 or cfg.training.fp16
    autocast = half and not getattr(cfg.training, "low_precision_params", False)
    a = 2 if half else 4
    return dict(s=s, b=b, t=t, ts=ts, h=m.hidden_size, n=m.num_attention_heads // tp,
                g=m.num_query_groups // tp, d=head_dim(cfg), f=m.ffn_hidden_size // tp, a=a,
                r=4 if autocast else a, autocast=autocast, tp=tp, sp=p.sequence_parallel and tp > 1, cp=cp)


def block_attention(cfg: Config) -> bool:
    """Whether attention takes the context-parallel / packed-document path."""
    return cfg.parallel.context_parallel_size > 1 or cfg.data.reset_attention_mask


def positions_from_ids(cfg: Config) -> bool:
    """Whether RoPE tables come from the batch's position ids (not the cached 0..s−1 tables)."""
    return cfg.model.position_embedding_type == "rope" and (
        cfg.parallel.context_parallel_size > 1 or cfg.data.reset_position_ids)


def _norm_bytes(cfg: Config, device: str, D: dict) -> int:
    """dtype size of what a norm keeps and outputs: CPU autocast runs RMSNorm in fp32 (its input is
    cast, so the 16-bit residual is not what is kept); LayerNorm and the Triton norms keep the input's."""
    half = cfg.training.bf16 or cfg.training.fp16
    rms_cpu = device == "cpu" and cfg.model.normalization == "RMSNorm"
    return 4 if (rms_cpu and half) else D["r"]


def _norm(cfg: Config, device: str, D: dict) -> float:
    ts, h = D["ts"], D["h"]
    nb = _norm_bytes(cfg, device, D)
    if cfg.model.normalization == "LayerNorm" or device == "cuda":
        return nb * ts * h + 2 * 4 * ts
    return 2 * nb * ts * h + 4 * ts


def _column_input(cfg: Config, device: str, D: dict, blocks: bool = False) -> float:
    """What a column-parallel layer (QKV, FC1, output layer) keeps of its input, a norm output (in the
    residual's dtype): as the norm produced it when its own Function runs it (fused blocks, or SP: the
    local shard), else F.linear's 16-bit cast."""
    return (D["r"] if (D["sp"] or blocks) else D["a"]) * D["ts"] * D["h"]


def _dropout(p: float, device: str, D: dict, nbytes: int) -> float:
    if p <= 0:
        return 0.0
    return (nbytes if device == "cpu" else 1) * D["ts"] * D["h"]


def weight_copies(cfg: Config, D: dict, moe: bool = False) -> dict:
    """Autocast over fp32 parameters: each F.linear keeps the 16-bit copy of its weight. The column
    layers with their own autograd Function (fused blocks: QKV and SwiGLU FC1; any under SP) cast
    inside it and keep only the fp32 parameter."""
    if not D["autocast"]:
        return {}
    m, h = cfg.model, D["h"]
    q_local, f_local = m.num_attention_heads * D["d"] // D["tp"], D["f"]
    if moe:  # the experts' copies are the MoE terms' "expert weights"; here only the shared expert's
        f_local = (cfg.moe.moe_shared_expert_intermediate_size or 0) // D["tp"]
    row = h * q_local + h * f_local                       # projection and FC2
    if m.multi_latent_attention:  # its projections are all F.linear: the replicated down-projections,
        n, r, qk = D["n"], m.kv_lora_rank, m.qk_head_dim + m.qk_pos_emb_head_dim  # the column ones unless SP
        row = h * n * m.v_head_dim + h * f_local + h * (r + m.qk_pos_emb_head_dim)
        up = n * (m.qk_head_dim + m.v_head_dim) * r + (n * qk * (m.q_lora_rank or h))
        row += (0 if D["sp"] else up) + (m.q_lora_rank * h if m.q_lora_rank else 0)
    gelu_fc1 = 0 if (D["sp"] or m.swiglu) else f_local * h
    return {"weight copies": 2 * (row + gelu_fc1)}


def _attention(cfg: Config, device: str, D: dict, selective: bool) -> tuple[dict, float]:
    """Saved bytes of the attention between the QKV linear and the projection, and the extra bytes its
    selective recompute brings back during backward."""
    a, t, s, b, n, g, d = D["a"], D["t"], D["s"], D["b"], D["n"], D["g"], D["d"]
    qkv = a * t * (n + 2 * g) * d
    rope = tables = 0.0
    if cfg.model.position_embedding_type == "rope":
        qkv = a * t * g * d  # v; q and k give way to their RoPE outputs
        rope = a * t * (n + g) * d
        if device == "cpu" and a != 4:  # the torch path casts the fp32 tables to q's dtype, for q and k
            tables = 4 * a * s * d
    out = a * t * n * d
    lse = 4 * b * n * s
    if block_attention(cfg):
        p = cfg.parallel
        kv_heads = n if (p.cp_comm_type == "a2a" and g % D["cp"]) else g
        inputs = a * t * (n + 2 * kv_heads) * d
        if p.cp_comm_type != "a2a" or D["cp"] == 1:  # the RoPE outputs and v are what it keeps
            inputs = (a * t * g * d + rope) if cfg.model.position_embedding_type == "rope" else qkv
        state_ = 4 * t * n * d + 4 * b * n * s
        if selective:
            return {"attention inputs": inputs + tables, "attention output": out}, state_
        return {"attention inputs": inputs + tables, "attention accumulator and lse": state_,
                "projection input": out}, 0.0
    math = device == "cpu" and cfg.model.attention_dropout > 0
    internals = (3 * 4 * t * n * d + 3 * 4 * b * n * s * s) if math else out + lse
    if selective:  # checkpoint(core, q, k, v): q, k, v kept; the projection keeps the output
        return {"qkv output": qkv, "rope outputs": rope + tables, "attention output": out}, internals
    if math:
        return {"rope tables": tables, "attention math": internals, "projection input": out}, 0.0
    return {"qkv output": qkv, "rope outputs": rope + tables, "attention output": out, "logsumexp": lse}, 0.0


def _latent(cfg: Config, device: str, D: dict, rank: int, produced: int) -> float:
    """An MLA latent (model/mla.py): its RMSNorm (input, normalised input, rstd; CPU autocast casts a
    16-bit input to fp32 and keeps the copy, else the input is a view of the down-projection's output
    of width `produced`) and the up-projection's input, the norm output (cast by F.linear under
    autocast; the local shard as produced under SP)."""
    ts, a = D["ts"], D["a"]
    nb = 4 if (device == "cpu" and D["a"] == 2) else a
    kept_input = 4 * ts * rank if nb != a else a * ts * produced
    norm = kept_input + (nb * ts * rank if device == "cpu" else 0) + 4 * ts
    return norm + (nb if (D["sp"] or not D["autocast"]) else a) * ts * rank


def _mla_attention(cfg: Config, device: str, D: dict, selective: bool) -> tuple[dict, float]:
    """Multi-latent attention between the down-projections' input and the output projection: the
    latents, then q, k and v with every head's key whole and the value padded to the query/key width
    w (model/attention.py) — the attention kernel keeps the padded tensors; the projection input is
    the cut-back output (a copy when padded)."""
    m = cfg.model
    a, t, s, b, n = D["a"], D["t"], D["s"], D["b"], D["n"]
    qk, dv, r, dr = m.qk_head_dim + m.qk_pos_emb_head_dim, m.v_head_dim, m.kv_lora_rank, m.qk_pos_emb_head_dim
    w = max(qk, dv)
    terms = {"kv latent": _latent(cfg, device, D, r, r + dr)}
    if m.q_lora_rank is not None:
        terms["q latent"] = _latent(cfg, device, D, m.q_lora_rank, m.q_lora_rank)
    qkv, proj = 3 * a * t * n * w, a * t * n * dv
    math = device == "cpu" and m.attention_dropout > 0
    internals = (3 * 4 * t * n * w + 3 * 4 * b * n * s * s) if math else a * t * n * w + 4 * b * n * s
    if selective:
        return dict(terms, **{"attention inputs": qkv, "attention output": proj}), internals
    if math:
        return dict(terms, **{"attention math": internals, "projection input": proj}), 0.0
    return dict(terms, **{"attention inputs": qkv, "attention output and lse": internals,
                          "projection input": proj if dv != w else 0}), 0.0


def _mlp_bytes(cfg: Config, device: str, a: int, tokens: float, f: float) -> float:
    """An MLP's own activations (what follows its FC1 input): GeLU 2·a·t·f; SwiGLU cpu 4·a·t·f, cuda 3·a·t·f."""
    if cfg.model.swiglu:
        return (4 if device == "cpu" else 3) * a * tokens * f
    return 2 * a * tokens * f


def _moe(cfg: Config, device: str, D: dict) -> dict:
    """An MoE layer (layers/moe/) after its input (the router's and shared expert's, counted as the
    dense FC1 input): the router's scores, choices and weights; the tokens permuted to their experts
    (in the GEMM dtype), each expert's MLP over the ts·k routed tokens (balanced), the experts' weights
    in the GEMM dtype when grouped or autocast (stacked, or F.linear's copies) with the grouped GEMM's
    offsets; the combine's indices, weights and expert outputs; the shared expert's MLP and gate."""
    e, m, p = cfg.moe, cfg.model, cfg.parallel
    a, ts, h = D["a"], D["ts"], D["h"]
    etp = p.expert_tensor_parallel_size or p.tensor_model_parallel_size
    k, num = e.moe_router_topk, e.num_experts
    local = num // p.expert_model_parallel_size
    f = (e.moe_ffn_hidden_size or m.ffn_hidden_size) // etp
    tk = ts * k * etp                    # routed tokens an expert rank computes (ETP ranks gather theirs)
    if e.moe_expert_capacity_factor is not None:  # each expert takes at most `cap` of each rank's tokens
        cap = capacity(ts * etp, k, num, e.moe_expert_capacity_factor)
        tk = num * cap if e.moe_pad_expert_input_to_capacity else min(tk, num * cap)
    blocks = 3 if m.swiglu else 2
    stacked = e.moe_grouped_gemm or D["autocast"]
    out = {"router": 4 * ts * num + 12 * ts * k + 4 * ts + 4 * num,
           "dispatched tokens": 8 * tk + a * tk * h,
           "experts": _mlp_bytes(cfg, device, a, tk, f),
           "expert weights": a * local * blocks * f * h if stacked else 0,
           "grouped gemm offsets": 4 * local * blocks if e.moe_grouped_gemm else 0,
           "combine": 8 * tk + a * tk + a * tk * h}
    if e.moe_expert_capacity_factor is not None:  # its pairs combine by index_add, which keeps the weighted rows
        out["combine"] += a * tk * h
    if e.moe_shared_expert_intermediate_size:
        out["shared expert"] = _mlp_bytes(cfg, device, a, D["t"], e.moe_shared_expert_intermediate_size // D["tp"])
        if e.moe_shared_expert_gate:  # sigmoid(x·w) × output: the fp32 output, the gate and its logit
            out["shared expert gate"] = 4 * ts * h + 2 * 4 * ts
    return out


def layer_terms(cfg: Config, device: str = "cpu", moe: bool = False) -> tuple[dict, float]:
    """(saved bytes by name, recompute extra) of one transformer layer for one micro-batch; `moe`: its
    MLP is an MoE layer (estimated for a balanced load; measured at EP = 1, TP = 1)."""
    m = cfg.model
    D = _dims(cfg)
    a, t, f = D["a"], D["t"], D["f"]
    selective = m.recompute_granularity == "selective"
    attend = _mla_attention if m.multi_latent_attention else _attention
    attn, extra = attend(cfg, device, D, selective)
    mlp = _mlp_bytes(cfg, device, a, t, f)
    # The residual branch's output: 16-bit GEMM output, promoted to fp32 by an fp32 bias under autocast.
    branch = D["r"] if (D["autocast"] and m.add_bias_linear) else a
    terms = {"input norm": _norm(cfg, device, D), "qkv input": _column_input(cfg, device, D, blocks=True),
             **attn, "attention dropout mask": _dropout(m.hidden_dropout, device, D, branch),
             "pre-mlp norm": _norm(cfg, device, D), "fc1 input": _column_input(cfg, device, D, m.swiglu),
             "mlp": mlp,
             "mlp dropout mask": _dropout(m.hidden_dropout, device, D, branch), **weight_copies(cfg, D, moe)}
    if moe:
        del terms["mlp"]
        terms.update(_moe(cfg, device, D))
    return {k: v for k, v in terms.items() if v}, extra


def rope_tables(cfg: Config, device: str = "cpu") -> float:
    """Each attention module caches fp32 cos/sin tables [s, d]; the RoPE of an fp32 q (or the Triton
    kernel) saves them: once per layer, not per micro-batch."""
    if cfg.model.position_embedding_type != "rope" or positions_from_ids(cfg):
        return 0.0
    if device == "cpu" and (cfg.training.bf16 or cfg.training.fp16):
        return 0.0  # the 16-bit copies are saved instead (per micro-batch, in the layer's terms)
    return 2 * 4 * cfg.data.seq_length * rotary_dim(cfg.model)


def embedding_terms(cfg: Config, device: str = "cpu") -> dict:
    D = _dims(cfg)
    t = D["t"]
    terms = {"token ids": 8 * t if D["tp"] == 1 else 8 * t + t}  # TP: local ids + out-of-range mask
    if cfg.model.position_embedding_type == "learned_absolute":
        terms["position ids"] = 8 * t
    terms["embedding dropout mask"] = _dropout(cfg.model.hidden_dropout, device, D, D["r"])
    return {k: v for k, v in terms.items() if v}


def head_terms(cfg: Config, device: str = "cpu") -> dict:
    D = _dims(cfg)
    a, t, h, tp = D["a"], D["t"], D["h"], D["tp"]
    v = cfg.padded_vocab_size // tp
    if tp > 1:  # vocab-parallel cross entropy: fp32 exp of the logits and its sum, local targets, mask
        loss = 4 * t * v + 4 * t + 8 * t + t
    elif device == "cpu":  # torch backend: fp32 log-probabilities, labels, kept-row mask
        loss = 4 * t * v + 8 * t + t
    else:  # Triton cross entropy: the logits, labels, fp32 logsumexp
        loss = a * t * v + 8 * t + 4 * t
    copy = 2 * v * h if (D["autocast"] and not D["sp"]) else 0
    terms = {"final norm": _norm(cfg, device, D), "output layer input": _column_input(cfg, device, D), "cross entropy": loss,
             "loss mask": 4 * t, "autocast weight copy": copy}
    return {k: val for k, val in terms.items() if val}


# Terms of a layer still alive when its backward reaches core attention.
ATTENTION_FRONT = ("input norm", "qkv input", "qkv output", "rope outputs", "rope tables", "attention inputs")


def chunk_segments(cfg: Config, pp_rank: int, v: int = 0, device: str = "cpu") -> list[Segment]:
    """The segments of chunk v of stage pp_rank for one micro-batch, in forward order."""
    m = cfg.model
    D = _dims(cfg)
    pre, post = chunk_flags(cfg, pp_rank, v)
    segs = []
    if positions_from_ids(cfg) and not (device == "cpu" and D["a"] != 4):
        # Tables from this micro-batch's position ids, saved (one storage) by every layer's RoPE.
        rows = D["s"] if not cfg.data.reset_position_ids else D["t"]
        segs.append(Segment("rope tables", 2 * 4 * rows * D["d"], terms={"rope tables": 2 * 4 * rows * D["d"]}))
    if pre:
        terms = embedding_terms(cfg, device)
        segs.append(Segment("embedding", sum(terms.values()), terms=terms))
    numbers = stage_layer_numbers(cfg, pp_rank, v)
    n_layers, moe = len(numbers), [is_moe_layer(cfg, number) for number in numbers]
    by_kind = {kind: layer_terms(cfg, device, kind) for kind in set(moe)}
    x = D["r"] * D["ts"] * D["h"]  # a layer's (or a checkpointed chunk's) input
    # A recomputed layer's first norm keeps that same input, unless it first casts it (CPU RMSNorm of a
    # 16-bit residual): then the recompute's copy is new memory.
    shared = x if _norm_bytes(cfg, device, D) == D["r"] else 0.0
    rope = rope_tables(cfg, device)  # seen by autograd only when the layer is not checkpointed whole
    layer_bytes = [sum(by_kind[kind][0].values()) for kind in moe]
    if m.recompute_granularity == "full":
        k = m.recompute_num_layers or 1
        if (m.recompute_method or "uniform") == "uniform":
            for start in range(0, n_layers, k):
                size = min(k, n_layers - start)
                chunk = sum(layer_bytes[start:start + size]) + size * rope
                segs.append(Segment(f"layers {start}-{start + size - 1} (recomputed)", x,
                                    extra=chunk - shared, terms={"chunk input": x}))
        else:  # block: the first k layers checkpointed one by one, the rest kept
            for i in range(n_layers):
                if i < k:
                    segs.append(Segment(f"layer {i} (recomputed)", x, extra=layer_bytes[i] + rope - shared,
                                        terms={"input": x}))
                else:
                    segs.append(Segment(f"layer {i}", layer_bytes[i], terms=by_kind[moe[i]][0]))
    else:
        # A layer's backward reaches core attention after the MLP and the projection have freed theirs:
        # only the front of the layer is still there when selective recompute brings the core back.
        for i in range(n_layers):
            terms, core_extra = by_kind[moe[i]]
            front = {k: v for k, v in terms.items() if k in ATTENTION_FRONT}
            back = {k: v for k, v in terms.items() if k not in ATTENTION_FRONT}
            segs.append(Segment(f"layer {i} up to core attention", sum(front.values()), extra=core_extra,
                                terms=front))
            segs.append(Segment(f"layer {i} from the projection on", sum(back.values()), terms=back))
    if post:
        terms = head_terms(cfg, device)
        segs.append(Segment("output", sum(terms.values()), terms=terms))
        for k in range(m.mtp_num_layers or 0):
            terms = mtp_terms(cfg, device)
            segs.append(Segment(f"multi-token prediction {k + 1}", sum(terms.values()), terms=terms))
    return segs


def mtp_terms(cfg: Config, device: str = "cpu") -> dict:
    """One multi-token-prediction module (model/mtp.py), never recomputed: its token ids' embedding,
    the norms of the hidden state and of the embedding, the projection's input (their concatenation),
    a transformer layer with its own RoPE tables, its final norm, logits and loss as the main head's
    (the output layer's 16-bit weight copy is autocast's cached one), and the shifted loss mask."""
    D = _dims(cfg)
    layer, _ = layer_terms(cfg, device, is_moe_layer(cfg, cfg.model.num_layers))
    embedding = {k: v for k, v in embedding_terms(cfg, device).items() if k == "token ids"}
    cat = (D["a"] if D["autocast"] else D["r"]) * D["ts"] * 2 * D["h"]
    head = {k: v for k, v in head_terms(cfg, device).items() if k != "autocast weight copy"}
    # The hidden state's norm keeps the same input as the final norm before it (the main head's or the
    # previous module's), unless it casts it first.
    shared = D["r"] * D["ts"] * D["h"] if _norm_bytes(cfg, device, D) == D["r"] else 0.0
    return {**embedding, "mtp norms": 2 * _norm(cfg, device, D) - shared, "mtp projection input": cat,
            **{f"mtp layer {k}": v for k, v in layer.items()}, "mtp layer rope tables": rope_tables(cfg, device),
            **{f"mtp {k}": v for k, v in head.items()}, "mtp loss mask": 4 * D["t"]}


def chunk_peak(segs: list[Segment]) -> tuple[float, float]:
    """(bytes kept after the forward, peak while its backward runs last-to-first segment)."""
    total = sum(s.saved for s in segs)
    peak, prefix = total, 0.0
    prefixes = []
    for s in segs:
        prefix += s.saved
        prefixes.append(prefix)
    for s, pre in zip(segs, prefixes):
        peak = max(peak, pre + s.extra)
    return total, peak


def stage_activation_bytes(cfg: Config, pp_rank: int, device: str = "cpu") -> dict:
    """Peak activation bytes of a pipeline stage over one step of its schedule (1F1B, interleaved, or
    plain gradient accumulation), walking the schedule's own step order."""
    from megaflow.pipeline.plan import BACKWARD, step_order
    pp, vs = cfg.parallel.pipeline_model_parallel_size, virtual_pipeline_size(cfg)
    chunks = [chunk_segments(cfg, pp_rank, v, device) for v in range(vs)]
    kept = [chunk_peak(segs) for segs in chunks]
    live, peak, alive, most_alive = 0.0, 0.0, 0, 0
    # After 2·PP micro-batches the schedule only repeats its steady state: walk no further.
    mbs = num_microbatches(cfg)
    for step in step_order(pp_rank, pp, mbs if mbs <= 2 * pp else 2 * pp, vs):
        total, during_backward = kept[step.chunk]
        if step.op == BACKWARD:
            peak = max(peak, live - total + during_backward)
            live -= total
            alive -= 1
        else:
            live += total
            alive += 1
            peak = max(peak, live)
            most_alive = max(most_alive, alive)
    # RoPE tables are cached per attention module: counted once, and inside the regions a full
    # recompute checkpoints (where they are only seen while that region's backward runs).
    m = cfg.model
    kept_layers = sum(len(stage_layer_numbers(cfg, pp_rank, v)) for v in range(vs))
    if m.recompute_granularity == "full":
        whole = (m.recompute_method or "uniform") == "uniform"
        kept_layers = 0 if whole else sum(max(0, len(stage_layer_numbers(cfg, pp_rank, v))
                                              - (m.recompute_num_layers or 1)) for v in range(vs))
    fixed = rope_tables(cfg, device) * kept_layers
    return {"peak": peak + fixed, "per_microbatch": sum(k[0] for k in kept), "in_flight": most_alive,
            "single_microbatch_peak": max(k[1] for k in kept) if vs == 1 else None,
            "segments": chunks}
