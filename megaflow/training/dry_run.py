"""--dry-run: validate a launch without GPUs, data or process groups.

For the world size torchrun would give (WORLD_SIZE, or --world-size N), build every pipeline stage of one
tensor-parallel rank on the meta device (shapes only, nothing allocated, no weights initialised, no data
read), check the built parameters against the planner's count, and print the parallel layout (which
ranks hold which layers and which shards) and the memory estimate per rank (megaflow/planner). Exits
without starting a process group, so it runs on a login node, in CI, or under torchrun (rank 0 prints).
"""
from __future__ import annotations

from megaflow.config import Config, num_microbatches, set_vocab_size, virtual_pipeline_size
from megaflow.parallel import device as accelerator, state
from megaflow.parallel.state import layout_ranks
from megaflow.planner import tokenizer_vocab_size
from megaflow.planner.activations import stage_activation_bytes
from megaflow.planner.memory import model_state_bytes
from megaflow.planner.params import chunk_flags, head_dim, rank_parameters, stage_layer_numbers, \
    total_parameters

GIB = 1024 ** 3


def build_meta_stage(cfg: Config, pp_rank: int, tp_rank: int = 0) -> list:
    """The model chunks a rank of stage pp_rank builds, on the meta device."""
    from megaflow.model.gpt import GPTModel
    p = cfg.parallel
    tp, pp, vs = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, virtual_pipeline_size(cfg)
    rank = tp_rank + tp * cfg.data_parallel_size * pp_rank
    with state.simulated(cfg.world_size, tp, pp, rank, device="meta", virtual_pp=vs,
                         ep=p.expert_model_parallel_size, etp=p.expert_tensor_parallel_size):
        return [GPTModel(cfg, *chunk_flags(cfg, pp_rank, v), layer_numbers=stage_layer_numbers(cfg, pp_rank, v))
                for v in range(vs)]


def check_parameters(cfg: Config, pp_rank: int) -> int:
    """Built (meta) parameters == the planner's list, name by name; returns the count."""
    built = [[(n, p.numel()) for n, p in chunk.named_parameters()] for chunk in build_meta_stage(cfg, pp_rank)]
    planned = [[(q.name, q.numel) for q in chunk] for chunk in rank_parameters(cfg, pp_rank)]
    if built != planned:
        raise RuntimeError(f"planner and model disagree on stage {pp_rank}'s parameters: "
                           f"built {built} planned {planned}")
    return sum(n for chunk in built for _, n in chunk)


def _ranges(ranks: list[int]) -> str:
    out, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            out.append(str(start) if start == r else f"{start}-{r}")
            start = None
    text = ", ".join(out)
    return text if len(text) <= 90 else text[:87] + "..."


def _span(i: int, size: int) -> str:
    return str(i * size) if size == 1 else f"{i * size}-{(i + 1) * size - 1}"


def _shards(cfg: Config, tp_rank: int) -> str:
    m, tp = cfg.model, cfg.parallel.tensor_model_parallel_size
    n, g, f = m.num_attention_heads // tp, m.num_query_groups // tp, m.ffn_hidden_size // tp
    v = cfg.padded_vocab_size // tp
    return (f"heads {_span(tp_rank, n)}, query groups {_span(tp_rank, g)}, ffn columns {_span(tp_rank, f)}, "
            f"vocabulary rows {_span(tp_rank, v)}")


def layout_report(cfg: Config) -> list[str]:
    p = cfg.parallel
    tp, pp, dp, vs = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, cfg.data_parallel_size, \
        virtual_pipeline_size(cfg)
    cp = p.context_parallel_size
    groups = layout_ranks(cfg.world_size, tp, pp, cp)
    if cp == 1:
        lines = [f"layout: {cfg.world_size} ranks = TP {tp} x PP {pp} x DP {dp} (rank = tp + {tp}·(dp + {dp}·pp))"]
    else:
        lines = [f"layout: {cfg.world_size} ranks = TP {tp} x CP {cp} x PP {pp} x DP {dp} "
                 f"(rank = tp + {tp}·(cp + {cp}·(dp + {dp}·pp))), context parallel {p.cp_comm_type}: "
                 f"{cfg.data.seq_length // cp} tokens of each sequence per rank"]
    lines = [lines[0] + (", sequence parallel" if p.sequence_parallel else "")
             + (f", {vs} model chunks per stage (interleaved)" if vs > 1 else "")]
    for r in range(pp):
        ranks = sorted(x for x in range(cfg.world_size) if x // (tp * cp * dp) == r)
        parts = []
        for v in range(vs):
            layers = stage_layer_numbers(cfg, r, v)
            pre, post = chunk_flags(cfg, r, v)
            what = f"layers {layers[0]}-{layers[-1]}" if layers else "no layers"
            what = ("embedding + " if pre else "") + what + (" + final norm, output layer, loss" if post else "")
            parts.append(what if vs == 1 else f"chunk {v}: {what}")
        lines.append(f"  stage {r}: ranks {_ranges(ranks)} | " + "; ".join(parts))
    if tp > 1:
        for t in range(tp):
            members = [x for x in range(cfg.world_size) if x % tp == t]
            lines.append(f"  TP rank {t} (ranks {_ranges(members)}): {_shards(cfg, t)}")
    lines.append(f"  groups: TP {groups['tp'][0]}..., DP {groups['dp'][0]}..., PP {groups['pp'][0]}..."
                 + (f", CP {groups['cp'][0]}..., gradients over DP×CP {groups['dp_cp'][0]}..." if cp > 1 else ""))
    if cfg.moe.num_experts is not None:
        ep, etp = p.expert_model_parallel_size, p.expert_tensor_parallel_size or tp
        ex = layout_ranks(cfg.world_size, tp, pp, ep=ep, etp=etp)
        per = cfg.moe.num_experts // ep
        lines.append(f"  experts: {cfg.moe.num_experts} per MoE layer, {per} per EP rank (EP rank e holds experts "
                     f"{per}·e..{per}·e+{per - 1}); groups: expert-TP {ex['etp'][0]}..., EP {ex['ep'][0]}..., "
                     f"expert-DP {ex['edp'][0]}...")
    return lines


def memory_report(cfg: Config, device: str) -> list[str]:
    lines = [f"memory per rank (GiB; activations for the {device} kernels, at the stage's peak in its schedule):",
             "  stage  parameters  gradients  optimizer  activations  (micro-batches alive)    total"]
    for r in range(cfg.parallel.pipeline_model_parallel_size):
        states = model_state_bytes(cfg, r)
        act = stage_activation_bytes(cfg, r, device)
        total = states["parameters"] + states["gradients"] + states["optimizer"] + act["peak"] + states["gathered"]
        lines.append(f"  {r:>5}  {states['parameters'] / GIB:10.3f} {states['gradients'] / GIB:10.3f} "
                     f"{states['optimizer'] / GIB:10.3f} {act['peak'] / GIB:12.3f}  ({act['in_flight']:>3}){'':>17}"
                     f"{total / GIB:8.3f}")
        if states["gathered"]:
            lines.append(f"         ZeRO-3: the total includes {states['gathered'] / GIB:.3f} GiB of parameters gathered "
                         "at most inside a step (the chunk's own unit and two layers, whole)")
    return lines


def _attention_summary(cfg) -> str:
    m = cfg.model
    if m.multi_latent_attention:
        q = f"query latent {m.q_lora_rank}, " if m.q_lora_rank else ""
        return (f"multi-latent: {q}KV latent {m.kv_lora_rank}, query/key dim {m.qk_head_dim} + "
                f"{m.qk_pos_emb_head_dim} rotary, value dim {m.v_head_dim}")
    return f"query groups {m.num_query_groups}, head dim {head_dim(cfg)}"


def _moe_summary(cfg: Config) -> str:
    e, p = cfg.moe, cfg.parallel
    if e.num_experts is None:
        return ""
    return (f" ({total_parameters(cfg, active=True):,} active per token: {e.num_experts} experts of width "
            f"{e.moe_ffn_hidden_size}, top-{e.moe_router_topk}, EP {p.expert_model_parallel_size}, expert TP "
            f"{p.expert_tensor_parallel_size or p.tensor_model_parallel_size})")


def dry_run(cfg: Config) -> str:
    vocab, source = tokenizer_vocab_size(cfg)
    set_vocab_size(cfg, vocab)
    m, t = cfg.model, cfg.training
    counts = [check_parameters(cfg, r) for r in range(cfg.parallel.pipeline_model_parallel_size)]
    device = t.device or accelerator.default_device().type
    mbs = num_microbatches(cfg)
    pp, vs = cfg.parallel.pipeline_model_parallel_size, virtual_pipeline_size(cfg)
    bubble = (pp - 1) / (vs * mbs + pp - 1) if pp > 1 else 0.0
    lines = ["megaflow dry run: nothing allocated, no process group, no data read",
             f"model: {m.model_style} style, {m.num_layers} layers, hidden {m.hidden_size}, heads "
             f"{m.num_attention_heads} ({_attention_summary(cfg)}), ffn "
             f"{m.ffn_hidden_size}, vocabulary {vocab} (from the {source}) padded to {cfg.padded_vocab_size}: "
             f"{total_parameters(cfg):,} parameters" + _moe_summary(cfg)
             + (f"; {m.mtp_num_layers} multi-token-prediction module(s) on the last stage" if m.mtp_num_layers else ""),
             f"batch: global {t.global_batch_size} = micro-batch {t.micro_batch_size} x {mbs} micro-batches x DP "
             f"{cfg.data_parallel_size}, sequence {cfg.data.seq_length}"
             + (f"; pipeline bubble {bubble:.1%}" if pp > 1 else "")]
    lines += layout_report(cfg)
    lines.append("  parameters per rank by stage: " + ", ".join(f"{c:,}" for c in counts)
                 + " (built on the meta device; equal to the planner's count)")
    lines += memory_report(cfg, device)
    lines.append("dry run OK: the configuration is valid for this world size")
    return "\n".join(lines)
