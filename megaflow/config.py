"""megaflow's configuration: typed dataclasses, one source of truth.

Every field is reachable from the command line under Megatron-LM's flag name (`--num-layers`) and from
an optional YAML file (`--config run.yaml`, keys are field or flag names, flat or grouped by section).
Precedence: dataclass default < model-style preset < YAML < command line. `validate()` checks the
combinations and names the offending flag; it runs before any process group is created.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A configuration problem; the message names the flag."""


def _f(default=None, help="", flag=None, choices=None, action=None, **kw):
    """A config field: its default, CLI help, and (when not derived from the name) its flag."""
    meta = {"help": help, "flag": flag, "choices": choices, "action": action}
    if callable(default) and not isinstance(default, type):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta, **kw)


# Defaults the two model styles apply to fields the user did not set.
MODEL_STYLES = {
    "gpt2": dict(normalization="LayerNorm", position_embedding_type="learned_absolute", swiglu=False,
                 add_bias_linear=True, untie_embeddings_and_output_weights=False),
    "llama": dict(normalization="RMSNorm", position_embedding_type="rope", swiglu=True,
                  add_bias_linear=False, untie_embeddings_and_output_weights=True),
}


@dataclass
class ModelConfig:
    model_style: str = _f("gpt2", "preset for the style-dependent fields below", choices=list(MODEL_STYLES))
    num_layers: int = _f(2, "transformer layers")
    hidden_size: int = _f(128, "model width")
    ffn_hidden_size: Optional[int] = _f(None, "MLP width (default 4h, or ~8h/3 rounded to 64 with SwiGLU)")
    num_attention_heads: int = _f(4, "attention heads")
    kv_channels: Optional[int] = _f(None, "head dimension (default hidden/heads)")
    group_query_attention: bool = _f(False, "use grouped-query attention", action="store_true")
    num_query_groups: Optional[int] = _f(None, "key/value heads with --group-query-attention")
    normalization: Optional[str] = _f(None, "norm type", choices=["LayerNorm", "RMSNorm"])
    norm_epsilon: float = _f(1e-5, "norm epsilon")
    swiglu: Optional[bool] = _f(None, "SwiGLU MLP instead of GeLU", action="store_true")
    position_embedding_type: Optional[str] = _f(None, "positions", choices=["learned_absolute", "rope"])
    rotary_base: int = _f(10000, "RoPE base (theta)")
    max_position_embeddings: Optional[int] = _f(None, "longest sequence (default --seq-length)")
    untie_embeddings_and_output_weights: Optional[bool] = _f(None, "separate output layer", action="store_true")
    add_bias_linear: Optional[bool] = _f(None, "biases in linear layers", flag="--disable-bias-linear",
                                         action="store_false")
    init_method_std: float = _f(0.02, "std of the normal init")
    attention_dropout: float = _f(0.1, "dropout on attention probabilities")
    hidden_dropout: float = _f(0.1, "dropout on residual branches and embeddings")
    make_vocab_size_divisible_by: int = _f(128, "pad the vocabulary to a multiple of this × TP")
    recompute_granularity: Optional[str] = _f(None, "activation recompute", choices=["full", "selective"])
    recompute_method: Optional[str] = _f(None, "layers to recompute", choices=["uniform", "block"])
    recompute_num_layers: Optional[int] = _f(None, "layers per recompute chunk (uniform) or count (block)")
    attention_backend: str = _f("auto", "attention kernel", choices=["auto", "torch", "triton", "flash-attn"])
    norm_backend: str = _f("auto", "norm kernel", choices=["auto", "torch", "triton", "apex"])


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = _f(1, "tensor-parallel size (TP)")
    pipeline_model_parallel_size: int = _f(1, "pipeline-parallel size (PP)")
    sequence_parallel: bool = _f(False, "shard norms/dropout along the sequence (needs TP>1)",
                                 action="store_true")
    num_layers_per_virtual_pipeline_stage: Optional[int] = _f(None, "layers per interleaved chunk")
    decoder_first_pipeline_num_layers: Optional[int] = _f(None, "layers on the first pipeline stage")
    decoder_last_pipeline_num_layers: Optional[int] = _f(None, "layers on the last pipeline stage")
    use_distributed_optimizer: bool = _f(False, "ZeRO: shard optimizer state across DP", action="store_true")
    overlap_grad_reduce: bool = _f(False, "overlap DP gradient reduction with backward", action="store_true")
    overlap_param_gather: bool = _f(False, "overlap parameter all-gather with forward", action="store_true")
    zero_stage: int = _f(2, "with --use-distributed-optimizer: 1 all-reduces gradients, 2 reduce-scatters "
                            "them (each rank keeps its shard)", choices=[1, 2])
    ddp_bucket_size: Optional[int] = _f(None, "elements per gradient-reduction bucket (default 40M)")
    distributed_backend: Optional[str] = _f(None, "default: nccl with CUDA, else gloo", choices=["nccl", "gloo"])
    distributed_timeout_minutes: float = _f(10.0, "collective timeout")
    dry_run_world_size: Optional[int] = _f(None, "with --dry-run: the world size to plan for (default: "
                                                 "$WORLD_SIZE, as torchrun sets it)", flag="--world-size")


@dataclass
class DataConfig:
    data_path: Optional[list] = _f(None, "[weight] prefix pairs of .bin/.idx datasets", action="nargs+")
    split: str = _f("969,30,1", "train,valid,test proportions of --data-path")
    train_data_path: Optional[list] = _f(None, "separate training datasets", action="nargs+")
    valid_data_path: Optional[list] = _f(None, "separate validation datasets", action="nargs+")
    test_data_path: Optional[list] = _f(None, "separate test datasets", action="nargs+")
    data_cache_path: Optional[str] = _f(None, "where GPTDataset index caches go")
    mock_data: bool = _f(False, "synthetic data, no files", action="store_true")
    seq_length: int = _f(128, "tokens per sample")
    tokenizer_type: Optional[str] = _f(None, "tokenizer (NullTokenizer, HuggingFaceTokenizer, ...)")
    tokenizer_model: Optional[str] = _f(None, "tokenizer file or folder")
    vocab_file: Optional[str] = _f(None, "GPT-2 BPE vocab.json")
    merge_file: Optional[str] = _f(None, "GPT-2 BPE merges.txt")
    vocab_size: Optional[int] = _f(None, "vocabulary size for NullTokenizer")
    eod_mask_loss: bool = _f(False, "no loss on the token after an EOD", action="store_true")
    reset_position_ids: bool = _f(False, "restart positions after EOD", action="store_true")
    reset_attention_mask: bool = _f(False, "no attention across EOD", action="store_true")
    num_workers: int = _f(2, "dataloader worker processes")


@dataclass
class TrainingConfig:
    micro_batch_size: int = _f(4, "samples per micro-batch per DP rank")
    global_batch_size: Optional[int] = _f(None, "samples per step (default micro × DP)")
    train_iters: Optional[int] = _f(None, "optimizer steps")
    train_samples: Optional[int] = _f(None, "samples to train on (alternative to --train-iters)")
    exit_interval: Optional[int] = _f(None, "stop (after saving) when iteration % N == 0")
    seed: int = _f(1234, "random seed")
    optimizer: str = _f("adam", "AdamW or SGD", choices=["adam", "sgd"])
    lr: float = _f(1e-4, "peak learning rate")
    min_lr: float = _f(0.0, "floor of the decay")
    lr_decay_style: str = _f("linear", "schedule after warmup",
                             choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"])
    lr_decay_iters: Optional[int] = _f(None, "iterations of decay (default --train-iters)")
    lr_warmup_iters: int = _f(0, "linear warmup iterations")
    lr_warmup_fraction: Optional[float] = _f(None, "warmup as a fraction of the decay iterations")
    lr_wsd_decay_style: str = _f("exponential", "WSD final decay shape",
                                 choices=["exponential", "linear", "cosine"])
    lr_wsd_decay_iters: Optional[int] = _f(None, "iterations of the WSD final decay")
    weight_decay: float = _f(0.01, "AdamW decoupled weight decay")
    clip_grad: float = _f(1.0, "global gradient-norm clip (0 disables)")
    adam_beta1: float = _f(0.9, "Adam beta1")
    adam_beta2: float = _f(0.999, "Adam beta2")
    adam_eps: float = _f(1e-8, "Adam epsilon")
    sgd_momentum: float = _f(0.9, "SGD momentum")
    bf16: bool = _f(False, "bf16 autocast", action="store_true")
    fp16: bool = _f(False, "fp16 autocast with dynamic loss scaling", action="store_true")
    low_precision_params: bool = _f(False, "with --bf16/--fp16: keep the model's parameters in that dtype "
                                    "and fp32 main parameters and gradients in the optimizer (Megatron's "
                                    "--bf16); default: fp32 parameters under autocast", action="store_true")
    loss_scale: Optional[float] = _f(None, "static fp16 loss scale (default dynamic)")
    initial_loss_scale: float = _f(2.0 ** 32, "first dynamic loss scale")
    min_loss_scale: float = _f(1.0, "dynamic scale floor")
    loss_scale_window: int = _f(1000, "clean steps before the scale doubles")
    hysteresis: int = _f(2, "overflow steps before the scale halves")
    eval_interval: Optional[int] = _f(1000, "evaluate every N iterations")
    eval_iters: int = _f(100, "batches per evaluation")
    early_stopping_patience: Optional[int] = _f(None, "stop after N evaluations without improvement")
    check_for_spiky_loss: bool = _f(False, "stop (without saving) when the loss jumps above --spiky-loss-factor "
                                           "× the largest of the last 100 losses", action="store_true")
    spiky_loss_factor: float = _f(10.0, "how many times the recent maximum counts as a spike")
    device: Optional[str] = _f(None, "cpu or cuda (default: cuda when available)", choices=["cpu", "cuda"])
    dry_run: bool = _f(False, "build on the meta device, print the parallel layout and memory per rank, "
                              "and exit (no process group, no data)", action="store_true")


@dataclass
class CheckpointConfig:
    save: Optional[str] = _f(None, "checkpoint directory to save to")
    load: Optional[str] = _f(None, "checkpoint directory to resume from")
    save_interval: Optional[int] = _f(None, "save every N iterations")
    no_load_optim: bool = _f(False, "do not restore optimizer state", action="store_true")
    no_load_rng: bool = _f(False, "do not restore RNG state", action="store_true")
    finetune: bool = _f(False, "load weights only; restart iteration count", action="store_true")
    async_save: bool = _f(False, "write checkpoints from a background thread after a synchronous copy to CPU",
                          action="store_true")
    save_retain_interval: Optional[int] = _f(None, "delete older checkpoints except multiples of N (and the "
                                                   "--keep-last-n-checkpoints latest)")
    keep_last_n_checkpoints: Optional[int] = _f(None, "delete checkpoints older than the N latest (except "
                                                      "multiples of --save-retain-interval)")


@dataclass
class LoggingConfig:
    log_interval: int = _f(100, "iterations between log lines")
    tensorboard_dir: Optional[str] = _f(None, "write TensorBoard scalars here")
    peak_tflops: Optional[float] = _f(None, "per-device peak for MFU (default: from the device)")
    pipeline_timeline_dir: Optional[str] = _f(None, "record each rank's (op, micro-batch, start, end) here "
                                                    "(tools/pipeline_timeline.py draws it)")
    pipeline_timeline_iters: int = _f(3, "how many of the first iterations to record")


SECTIONS = {"model": ModelConfig, "parallel": ParallelConfig, "data": DataConfig,
            "training": TrainingConfig, "checkpoint": CheckpointConfig, "logging": LoggingConfig}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Derived at validation from the world size; not flags.
    world_size: int = 1
    data_parallel_size: int = 1
    vocab_size: Optional[int] = None         # the tokenizer's vocabulary (NullTokenizer adds its EOD)
    padded_vocab_size: Optional[int] = None  # vocab_size rounded up for TP (pad_vocab_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        cfg = cls()
        for section, klass in SECTIONS.items():
            setattr(cfg, section, klass(**d.get(section, {})))
        for k in ("world_size", "data_parallel_size", "vocab_size", "padded_vocab_size"):
            if k in d:
                setattr(cfg, k, d[k])
        return cfg


# ---------------------------------------------------------------------------------------------
# Flag table: flag name -> (section, field)

def _flag_name(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _field_table():
    table = {}
    for section, klass in SECTIONS.items():
        for f in fields(klass):
            table[_flag_name(f)] = (section, f)
    return table


FIELDS = _field_table()
_BY_NAME = {f.name: (section, f) for section, f in FIELDS.values()}


def _scalar_type(section: str, f) -> type:
    hint = get_type_hints(SECTIONS[section])[f.name]
    if get_origin(hint) is Union:
        hint = next(a for a in get_args(hint) if a is not type(None))
    return hint


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_gpt.py", description="megaflow GPT pretraining (Megatron-LM flag names)",
        argument_default=argparse.SUPPRESS, allow_abbrev=False)
    p.add_argument("--config", help="YAML file of settings (command-line flags override it)")
    for flag, (section, f) in FIELDS.items():
        help_text = (f.metadata.get("help") or "").replace("%", "%%")  # argparse formats help with %
        action, kw = f.metadata.get("action"), {"help": help_text, "dest": f"{section}.{f.name}"}
        if action in ("store_true", "store_false"):
            p.add_argument(flag, action=action, **kw)
        elif action == "nargs+":
            p.add_argument(flag, nargs="+", **kw)
        else:
            typ = _scalar_type(section, f)
            p.add_argument(flag, type=typ, choices=f.metadata.get("choices"), **kw)
    return p


def _coerce(section: str, f, value, origin: str):
    """Type-check a YAML value against the field's type; errors name the key."""
    if value is None:
        return None
    typ = list if f.metadata.get("action") == "nargs+" else _scalar_type(section, f)
    try:
        if typ is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if typ is list:
            return [str(v) for v in (value if isinstance(value, list) else str(value).split())]
        if typ is int and isinstance(value, float) and not value.is_integer():
            raise TypeError
        value = typ(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{origin}: {_flag_name(f)} expects {typ.__name__}, got {value!r}") from None
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{origin}: {_flag_name(f)} must be one of {choices}, got {value!r}")
    return value


def _load_yaml(path: str) -> dict:
    """YAML keys may be field names or flag names, flat or under a section name."""
    import yaml
    try:
        with open(path) as fh:
            raw = yaml.safe_load(fh) or {}
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a mapping of settings")
    flat = {}
    for key, value in raw.items():
        if key in SECTIONS and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    out = {}
    for key, value in flat.items():
        name = str(key).lstrip("-").replace("-", "_")
        hit = _BY_NAME.get(name) or FIELDS.get("--" + str(key).lstrip("-"))
        if hit is None:
            raise ConfigError(f"--config {path}: unknown setting {key!r}")
        section, f = hit
        v = _coerce(section, f, value, f"--config {path}")
        if f.metadata.get("action") == "store_false" and key.lstrip("-").startswith("disable"):
            v = not v  # `disable-bias-linear: true` means add_bias_linear = False
        out[(section, f.name)] = v
    return out


def parse_args(argv=None, world_size: Optional[int] = None, check: bool = True) -> Config:
    """Command line (+ YAML) -> validated Config. Raises ConfigError naming the flag.
    check=False fills the derived fields but leaves validation to the caller (the run planner, which
    validates each layout it tries)."""
    parser = build_parser()
    try:
        ns, unknown = parser.parse_known_args(argv)
    except SystemExit as e:
        if e.code in (0, None):  # --help
            raise
        raise ConfigError("invalid command line (argparse printed the flag and the problem above)") from e
    if unknown:
        raise ConfigError(f"unknown flag(s): {' '.join(unknown)} (see --help)")
    given = {tuple(k.split(".", 1)): v for k, v in vars(ns).items() if k != "config"}
    settings = _load_yaml(ns.config) if getattr(ns, "config", None) else {}
    settings.update(given)
    cfg = Config()
    for (section, name), value in settings.items():
        setattr(getattr(cfg, section), name, value)
    return finalize(cfg, world_size=world_size, check=check)


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
    need(not p.overlap_param_gather or p.use_distributed_optimizer,
         "--overlap-param-gather needs --use-distributed-optimizer")
    need(p.ddp_bucket_size is None or p.ddp_bucket_size > 0, "--ddp-bucket-size must be positive")

    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    need(tp >= 1 and pp >= 1, "--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
    need(cfg.world_size % (tp * pp) == 0,
         f"world size {cfg.world_size} is not divisible by --tensor-model-parallel-size ({tp}) × "
         f"--pipeline-model-parallel-size ({pp})")
    cfg.data_parallel_size = dp = cfg.world_size // (tp * pp)
    need(m.num_attention_heads % tp == 0,
         f"--num-attention-heads ({m.num_attention_heads}) must be divisible by --tensor-model-parallel-size ({tp})")
    need(m.num_query_groups % tp == 0,
         f"--num-query-groups ({m.num_query_groups}) must be divisible by --tensor-model-parallel-size ({tp})")
    need(m.ffn_hidden_size % tp == 0,
         f"--ffn-hidden-size ({m.ffn_hidden_size}) must be divisible by --tensor-model-parallel-size ({tp})")
    if tp == 1:
        p.sequence_parallel = False  # nothing to shard; Megatron-LM switches it off the same way
    need(not p.sequence_parallel or d.seq_length % tp == 0,
         f"--sequence-parallel needs --seq-length ({d.seq_length}) divisible by "
         f"--tensor-model-parallel-size ({tp})")
    if t.global_batch_size is None:
        t.global_batch_size = t.micro_batch_size * dp
    need(t.global_batch_size % (t.micro_batch_size * dp) == 0,
         f"--global-batch-size ({t.global_batch_size}) must be a multiple of --micro-batch-size "
         f"({t.micro_batch_size}) × data-parallel size ({dp})")
    _validate_pipeline(cfg, need)
    need(m.recompute_method is None or m.recompute_granularity == "full",
         "--recompute-method needs --recompute-granularity full")
    if d.mock_data:
        need(d.data_path is None and d.train_data_path is None, "--mock-data cannot be combined with --data-path")
    need(t.lr_warmup_fraction is None or t.lr_warmup_iters == 0,
         "give --lr-warmup-iters or --lr-warmup-fraction, not both")
    need(t.early_stopping_patience is None or t.early_stopping_patience > 0,
         "--early-stopping-patience must be positive")
    need(t.spiky_loss_factor > 0, "--spiky-loss-factor must be positive")
    need(t.early_stopping_patience is None or t.eval_interval,
         "--early-stopping-patience needs --eval-interval")
    c = cfg.checkpoint
    need(c.keep_last_n_checkpoints is None or c.keep_last_n_checkpoints >= 1,
         "--keep-last-n-checkpoints must be at least 1")
    need(c.save_retain_interval is None or c.save_retain_interval >= 1, "--save-retain-interval must be positive")
    need(c.save_retain_interval is None or not c.save_interval or c.save_retain_interval % c.save_interval == 0,
         f"--save-retain-interval ({c.save_retain_interval}) must be a multiple of --save-interval ({c.save_interval})")


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


def format_config(cfg: Config) -> str:
    """The resolved configuration, one `name ....... value` line per field, as Megatron prints it."""
    lines = ["------------------------ megaflow arguments ------------------------"]
    for section in SECTIONS:
        for name, value in sorted(dataclasses.asdict(getattr(cfg, section)).items()):
            lines.append(f"  {name} {'.' * max(1, 48 - len(name))} {value}")
    lines.append(f"  world_size / data_parallel_size {'.' * 17} {cfg.world_size} / {cfg.data_parallel_size}")
    lines.append("-------------------- end of megaflow arguments ---------------------")
    return "\n".join(lines)


def config_from_kwargs(world_size: int = 1, **overrides: Any) -> Config:
    """Build a Config in code (tests, benchmarks): keyword = field name, in any section."""
    cfg = Config()
    for name, value in overrides.items():
        if name not in _BY_NAME:
            raise ConfigError(f"unknown setting {name!r}")
        setattr(getattr(cfg, _BY_NAME[name][0]), name, value)
    return finalize(cfg, world_size=world_size)
