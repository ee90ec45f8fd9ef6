"""Derived fields (style presets, FFN width, data-parallel size) and the checks that name a flag."""
from __future__ import annotations

import math
from typing import Optional

from megaflow.config.fields import ConfigError
from megaflow.config.model import MODEL_STYLES, validate_attention
from megaflow.config.resilience import validate_resilience_and_reporting
from megaflow.config.moe import validate_moe
from megaflow.config.root import Config


def finalize(cfg: Config, world_size: Optional[int] = None, check: bool = True) -> Config:
    """Fill derived and style-dependent fields, then validate (unless check=False). Idempotent."""
    m, d = cfg.model, cfg.data
    for name, value in MODEL_STYLES[m.model_style].items():
        if getattr(m, name) is None:
            setattr(m, name, value)
    if m.ffn_hidden_size is None:
        m.ffn_hidden_size = 4 * m.hidden_size
        if m.swiglu:  # keep the parameter count of a 4h GeLU MLP, rounded like Megatron-LM does
            m.ffn_hidden_size = max(64, int((4 * m.hidden_size * 2 / 3) / 64) * 64)
    if m.max_position_embeddings is None:
        m.max_position_embeddings = d.seq_length
    if not m.group_query_attention:
        m.num_query_groups = m.num_attention_heads
    elif m.num_query_groups is None:
        raise ConfigError("--group-query-attention needs --num-query-groups")
    if cfg.parallel.dry_run_world_size is not None:
        if not cfg.training.dry_run:
            raise ConfigError("--world-size is only for --dry-run (torchrun sets the world size of a real run)")
        if cfg.parallel.dry_run_world_size < 1:
            raise ConfigError("--world-size must be positive")
        world_size = cfg.parallel.dry_run_world_size
    if world_size is None:
        import os
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cfg.world_size = world_size
    if check:
        validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    m, p, d, t = cfg.model, cfg.parallel, cfg.data, cfg.training

    def need(ok: bool, msg: str):
        if not ok:
            raise ConfigError(msg)

    for name in ("num_layers", "hidden_size", "num_attention_heads", "micro_batch_size"):
        section = "training" if name == "micro_batch_size" else "model"
        need(getattr(getattr(cfg, section), name) > 0, f"--{name.replace('_', '-')} must be positive")
    need(d.seq_length > 0, "--seq-length must be positive")
    if m.kv_channels is None:
        need(m.hidden_size % m.num_attention_heads == 0,
             f"--hidden-size ({m.hidden_size}) must be divisible by --num-attention-heads "
             f"({m.num_attention_heads}) unless --kv-channels is set")
    need(m.num_query_groups > 0 and m.num_attention_heads % m.num_query_groups == 0,
         f"--num-attention-heads ({m.num_attention_heads}) must be divisible by --num-query-groups "
         f"({m.num_query_groups})")
    need(d.seq_length <= m.max_position_embeddings,
         f"--seq-length ({d.seq_length}) exceeds --max-position-embeddings ({m.max_position_embeddings})")
    need(not (t.bf16 and t.fp16), "--bf16 and --fp16 are mutually exclusive")
    need(t.train_iters is None or t.train_samples is None, "give --train-iters or --train-samples, not both")
    need(not t.low_precision_params or t.bf16 or t.fp16, "--low-precision-params needs --bf16 or --fp16")
    _resolve_sharding_strategy(p, need)
    need(p.zero_stage == 1 or p.use_distributed_optimizer,
         f"--zero-stage {p.zero_stage} needs --use-distributed-optimizer")
    need(p.reshard_after_forward or (p.use_distributed_optimizer and p.zero_stage == 3),
         "--no-reshard-after-forward keeps ZeRO-3's gathered parameters: it needs --zero-stage 3")
    need(not cfg.performance.gradient_accumulation_fusion or not p.use_distributed_optimizer or p.zero_stage == 1,
         f"--gradient-accumulation-fusion adds into the full fp32 gradient buffer, which --zero-stage "
         f"{p.zero_stage} does not keep: drop one of them")
    need(t.optimizer != "muon" or p.zero_stage == 1,
         f"--optimizer muon shards whole matrices over data parallel (ZeRO stage 1): drop --zero-stage "
         f"{p.zero_stage}")
    need(not p.overlap_param_gather or p.use_distributed_optimizer,
         "--overlap-param-gather needs --use-distributed-optimizer")
    need(p.ddp_bucket_size is None or p.ddp_bucket_size > 0, "--ddp-bucket-size must be positive")

    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    need(tp >= 1 and pp >= 1, "--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
    need(cp >= 1, "--context-parallel-size must be >= 1")
    # The model's own limits on TP first: they hold at any world size, so they are the real problem
    # when both these and the world-size check below fail.
    need(m.num_attention_heads % tp == 0,
         f"--num-attention-heads ({m.num_attention_heads}) must be divisible by --tensor-model-parallel-size ({tp})")
    need(m.num_query_groups % tp == 0,
         f"--num-query-groups ({m.num_query_groups}) must be divisible by --tensor-model-parallel-size ({tp})")
    need(m.ffn_hidden_size % tp == 0,
         f"--ffn-hidden-size ({m.ffn_hidden_size}) must be divisible by --tensor-model-parallel-size ({tp})")
    need(cfg.world_size % (tp * cp * pp) == 0,
         f"world size {cfg.world_size} is not divisible by --tensor-model-parallel-size ({tp}) × "
         + (f"--context-parallel-size ({cp}) × " if cp > 1 else "")
         + f"--pipeline-model-parallel-size ({pp}) (torchrun's --nnodes × --nproc-per-node)")
    cfg.data_parallel_size = dp = cfg.world_size // (tp * cp * pp)
    ep, etp = p.expert_model_parallel_size, p.expert_tensor_parallel_size or tp
    need(ep >= 1 and etp >= 1, "--expert-model-parallel-size and --expert-tensor-parallel-size must be >= 1")
    need((tp * cp * dp) % (etp * ep) == 0,
         f"--expert-tensor-parallel-size ({etp}) × --expert-model-parallel-size ({ep}) must divide the "
         f"{tp * cp * dp} ranks of a pipeline stage (TP {tp} × CP {cp} × DP {dp})")
    if tp == 1:
        p.sequence_parallel = False  # nothing to shard; Megatron-LM switches it off the same way
    validate_moe(cfg, need)
    validate_attention(cfg, need)
    need(not p.sequence_parallel or d.seq_length % tp == 0,
         f"--sequence-parallel needs --seq-length ({d.seq_length}) divisible by "
         f"--tensor-model-parallel-size ({tp})")
    if t.global_batch_size is None:
        t.global_batch_size = t.micro_batch_size * dp
    need(t.global_batch_size % (t.micro_batch_size * dp) == 0,
         f"--global-batch-size ({t.global_batch_size}) must be a multiple of --micro-batch-size "
         f"({t.micro_batch_size}) × data-parallel size ({dp})")
    _validate_pipeline(cfg, need)
    validate_resilience_and_reporting(cfg, need)
    _validate_context_parallel(cfg, need)
    need(m.recompute_method is None or m.recompute_granularity == "full",
         "--recompute-method needs --recompute-granularity full")
    if d.mock_data:
        need(d.data_path is None and d.train_data_path is None, "--mock-data cannot be combined with --data-path")
    need(t.lr_warmup_fraction is None or t.lr_warmup_iters == 0,
         "give --lr-warmup-iters or --lr-warmup-fraction, not both")
    need(t.early_stopping_patience is None or t.early_stopping_patience > 0,
         "--early-stopping-patience must be positive")
    need(0.0 <= m.label_smoothing < 1.0, f"--label-smoothing ({m.label_smoothing}) must be in [0, 1)")
    need(t.spiky_loss_factor > 0, "--spiky-loss-factor must be positive")
    need(t.early_stopping_patience is None or t.eval_interval,
         "--early-stopping-patience needs --eval-interval")
    c = cfg.checkpoint
    need(c.keep_last_n_checkpoints is None or c.keep_last_n_checkpoints >= 1,
         "--keep-last-n-checkpoints must be at least 1")
    need(c.save_retain_interval is None or c.save_retain_interval >= 1, "--save-retain-interval must be positive")
    need(c.save_retain_interval is None or not c.save_interval or c.save_retain_interval % c.save_interval == 0,
         f"--save-retain-interval ({c.save_retain_interval}) must be a multiple of --save-interval ({c.save_interval})")


SHARDING_STRATEGIES = {"no_shard": 0, "optim": 1, "optim_grads": 2, "optim_grads_params": 3}


def _resolve_sharding_strategy(p, need) -> None:
    """--data-parallel-sharding-strategy (Megatron's name) sets --use-distributed-optimizer and
    --zero-stage; given with a different --zero-stage it is a contradiction. Idempotent."""
    strategy = p.data_parallel_sharding_strategy
    if strategy is None:
        return
    stage = SHARDING_STRATEGIES[strategy]
    if stage == 0:
        need(not p.use_distributed_optimizer, "--data-parallel-sharding-strategy no_shard contradicts "
                                              "--use-distributed-optimizer: drop one of them")
        return
    need(p.zero_stage in (1, stage), f"--data-parallel-sharding-strategy {strategy} means --zero-stage {stage}, "
                                     f"not {p.zero_stage}: drop one of them")
    p.use_distributed_optimizer, p.zero_stage = True, stage


def _validate_pipeline(cfg: Config, need) -> None:
    """Layer splits and the interleaved schedule's conditions (FORMATS.md §3)."""
    n, p = cfg.model.num_layers, cfg.parallel
    pp, first, last = p.pipeline_model_parallel_size, p.decoder_first_pipeline_num_layers, \
        p.decoder_last_pipeline_num_layers
    k = p.num_layers_per_virtual_pipeline_stage
    uneven = [f for f, v in (("--decoder-first-pipeline-num-layers", first),
                             ("--decoder-last-pipeline-num-layers", last)) if v is not None]
    if uneven:
        need(pp > 1, f"{uneven[0]} needs --pipeline-model-parallel-size > 1")
        need(k is None, f"{uneven[0]} cannot be combined with --num-layers-per-virtual-pipeline-stage")
        need(all(v is None or v >= 1 for v in (first, last)), f"{uneven[0]} must be at least 1")
        given = [v for v in (first, last) if v is not None]
        rest, free = n - sum(given), pp - len(given)
        need(rest >= free and (rest == 0 if free == 0 else rest % free == 0),
             f"--num-layers ({n}) minus {' and '.join(uneven)} ({sum(given)}) leaves {rest} layers, which "
             f"cannot be split evenly over the other {free} pipeline stages (at least 1 layer each)")
    else:
        need(n % pp == 0, f"--num-layers ({n}) must be divisible by --pipeline-model-parallel-size ({pp}), "
                          "or give --decoder-first/last-pipeline-num-layers")
    if k is not None:
        need(pp > 1, "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
        need(k >= 1 and (n // pp) % k == 0,
             f"--num-layers-per-virtual-pipeline-stage ({k}) must divide the layers per pipeline stage "
             f"(--num-layers {n} / --pipeline-model-parallel-size {pp} = {n // pp})")
        need((n // pp) // k >= 2,
             f"--num-layers-per-virtual-pipeline-stage ({k}) equals the layers per pipeline stage "
             f"({n // pp}): one chunk per stage is plain 1F1B; drop the flag or use fewer layers per chunk")
        m = num_microbatches(cfg)
        need(m % pp == 0,
             f"the interleaved schedule needs the number of micro-batches (--global-batch-size / "
             f"(--micro-batch-size × data-parallel size) = {m}) to be a multiple of "
             f"--pipeline-model-parallel-size ({pp})")


def virtual_pipeline_size(cfg: Config) -> int:
    """Model chunks per pipeline rank: V = layers per stage / --num-layers-per-virtual-pipeline-stage."""
    p = cfg.parallel
    if p.num_layers_per_virtual_pipeline_stage is None or p.pipeline_model_parallel_size == 1:
        return 1
    return cfg.model.num_layers // p.pipeline_model_parallel_size // p.num_layers_per_virtual_pipeline_stage


def num_microbatches(cfg: Config) -> int:
    return cfg.training.global_batch_size // (cfg.training.micro_batch_size * cfg.data_parallel_size)


def pad_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's padding: round the vocabulary up to a multiple of divisible_by × TP."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def set_vocab_size(cfg: Config, tokenizer_vocab_size: int) -> None:
    """Record the tokenizer's vocabulary and its padded size (known only once the tokenizer exists)."""
    cfg.vocab_size = tokenizer_vocab_size
    cfg.padded_vocab_size = pad_vocab_size(tokenizer_vocab_size, cfg.model.make_vocab_size_divisible_by,
                                           cfg.parallel.tensor_model_parallel_size)




def _validate_context_parallel(cfg: Config, need) -> None:
    """Context parallelism and packed sequences: both take the block-attention path (layers/
    context_attention.py), which has no attention dropout and no flash-attn backend."""
    m, p, d = cfg.model, cfg.parallel, cfg.data
    tp, cp = p.tensor_model_parallel_size, p.context_parallel_size
    if cp > 1:
        need(d.seq_length % (2 * cp) == 0,
             f"--seq-length ({d.seq_length}) must be divisible by 2 × --context-parallel-size ({2 * cp}): "
             "each rank holds two of 2·CP chunks")
        need(not p.sequence_parallel or (d.seq_length // cp) % tp == 0,
             f"--sequence-parallel with --context-parallel-size {cp} needs --seq-length / CP "
             f"({d.seq_length // cp}) divisible by --tensor-model-parallel-size ({tp})")
        need(not cfg.moe.num_experts, "--context-parallel-size > 1 with --num-experts is not supported yet")
        if p.cp_comm_type == "a2a":
            need((m.num_attention_heads // tp) % cp == 0,
                 f"--cp-comm-type a2a needs the attention heads of a TP rank ({m.num_attention_heads // tp}) "
                 f"divisible by --context-parallel-size ({cp}); use --cp-comm-type p2p")
    if cp > 1 or d.reset_attention_mask:
        what = f"--context-parallel-size {cp}" if cp > 1 else "--reset-attention-mask"
        need(m.attention_dropout == 0, f"{what} needs --attention-dropout 0 (its attention kernels have no dropout)")
        need(m.attention_backend != "flash-attn",
             f"{what} needs --attention-backend triton, torch or auto (not flash-attn)")
