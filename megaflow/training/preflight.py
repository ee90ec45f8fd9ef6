"""Start-up checks of everything a run reads, before any process group, model or output file exists.

`check(cfg)` builds the tokenizer, opens every dataset prefix the flags name (both files, the index
header and sizes: constant time, nothing is read in bulk) and reads the --load checkpoint's metadata
and config, comparing its model with the flags. A problem raises a UserError naming the flag and the
file (megaflow/errors.py prints it once, without a traceback): a user learns about a typo in seconds,
not after the model is built, and a failed start leaves no empty checkpoint or TensorBoard files.

The trainer repeats the real work (the tokenizer, the datasets, the checkpoint load) and keeps its own
checks; these are the early, friendlier ones. `schedule_changes` tells a resumed run which schedule
flags differ from the checkpoint's.
"""
from __future__ import annotations

import glob
import os
import shlex

from megaflow.checkpoint import format as fmt
from megaflow.checkpoint.format import CheckpointError
from megaflow.config import Config, ConfigError, set_vocab_size
from megaflow.data.indexed_dataset import IndexedDataset, bin_path, idx_path
from megaflow.data.tokenizers import TokenizerError, build_tokenizer
from megaflow.data.utils import parse_blend, parse_split
from megaflow.errors import DataError


def check(cfg: Config):
    """Raise a UserError for the first input problem; returns the tokenizer (and sets cfg's vocabulary)."""
    tokenizer = check_tokenizer(cfg)
    set_vocab_size(cfg, tokenizer.vocab_size)
    check_data(cfg)
    if cfg.checkpoint.load:
        check_load(cfg)
    return tokenizer


# -- tokenizer ------------------------------------------------------------------------------------
def check_tokenizer(cfg: Config):
    d = cfg.data
    try:
        return build_tokenizer(d)
    except TokenizerError:
        raise
    except Exception as e:  # the library could not parse the file: name the flag and the file
        if d.tokenizer_type == "GPT2BPETokenizer":
            what = f"--vocab-file {d.vocab_file} / --merge-file {d.merge_file}"
        else:
            what = f"--tokenizer-model {d.tokenizer_model}"
        raise TokenizerError(f"{what}: cannot be read as a {d.tokenizer_type} ({type(e).__name__}: {e}); "
                             "check the path and that the file is complete") from e


# -- data -----------------------------------------------------------------------------------------
DATA_FLAGS = (("--data-path", "data_path"), ("--train-data-path", "train_data_path"),
              ("--valid-data-path", "valid_data_path"), ("--test-data-path", "test_data_path"))


def check_data(cfg: Config) -> None:
    d = cfg.data
    if d.mock_data:
        return
    if not any(getattr(d, name) for _flag, name in DATA_FLAGS):
        raise ConfigError("no training data: give --data-path PREFIX (the .bin/.idx pair tools/preprocess_data.py "
                          "writes), --train-data-path/--valid-data-path/--test-data-path, or --mock-data")
    try:
        parse_split(d.split)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for flag, name in DATA_FLAGS:
        try:
            blend = parse_blend(getattr(d, name), flag)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        for prefix in (blend[0] if blend else []):
            check_prefix(prefix, flag)


def check_prefix(prefix: str, flag: str = "--data-path") -> None:
    """Both files of a dataset prefix exist, are readable and form a complete MMIDIDX dataset."""
    files = (idx_path(prefix), bin_path(prefix))
    missing = [p for p in files if not os.path.exists(p)]
    if missing:
        raise DataError(f"{flag} {prefix}: {' and '.join(missing)} not found; {_missing_hint(prefix)}")
    for p in files:
        if not os.path.isfile(p):
            raise DataError(f"{flag} {prefix}: {p} is not a file")
        if not os.access(p, os.R_OK):
            raise DataError(f"{flag} {prefix}: {p} cannot be read (permission denied)")
    try:
        ds = IndexedDataset(prefix)
    except (ValueError, OSError) as e:
        raise DataError(f"{flag} {prefix}: {e}. Re-create the dataset with tools/preprocess_data.py") from None
    if len(ds) == 0:
        raise DataError(f"{flag} {prefix}: the dataset is empty ({idx_path(prefix)} lists 0 sequences)")


def _missing_hint(prefix: str) -> str:
    """Where the user probably meant, from the files that do exist."""
    for ext in (".bin", ".idx"):
        if prefix.endswith(ext) and IndexedDataset.exists(prefix[:-len(ext)]):
            return f"give the prefix without {ext}: {prefix[:-len(ext)]}"
    folder = os.path.dirname(prefix) or "."
    if not os.path.isdir(folder):
        return f"the folder {folder} does not exist"
    near = sorted(p[:-4] for p in glob.glob(glob.escape(prefix) + "*.idx"))
    if near:
        return (f"found {', '.join(near[:3])} (tools/preprocess_data.py names its output "
                "OUTPUT_PREFIX_text_document): pass that prefix")
    return "create it with tools/preprocess_data.py --input CORPUS.jsonl --output-prefix ... (docs/data.md)"


# -- checkpoint -----------------------------------------------------------------------------------
def check_load(cfg: Config) -> None:
    root = cfg.checkpoint.load
    if not os.path.exists(root):
        raise CheckpointError(f"--load {root}: no such directory. For a first run drop --load (--save DIR "
                              "writes checkpoints there; pass the same DIR to --load to resume)")
    if not os.path.isdir(root):
        raise CheckpointError(f"--load {root}: a file, expected a checkpoint directory")
    if fmt.latest_iteration(root) is None:
        if is_hf_folder(root):
            raise CheckpointError(f"--load {root}: a Hugging Face model folder, not a megaflow checkpoint; convert "
                                  f"it first: {convert_command(root, cfg)} and pass that --save directory to "
                                  "--load with --finetune")
        raise CheckpointError(f"--load {root}: no {fmt.TRACKER} (nothing saved there yet); drop --load for a "
                              "first run")
    try:
        reader = fmt.CheckpointReader(root)
    except CheckpointError as e:
        raise CheckpointError(f"--load {root}: {e}") from None
    try:
        for fname, size in reader.meta.get("files", {}).items():
            path = os.path.join(reader.dir, fname)
            if not os.path.isfile(path):
                raise CheckpointError(f"--load {root}: missing checkpoint file {path}")
            if size is not None and os.path.getsize(path) != size:
                raise CheckpointError(f"--load {root}: {path} is truncated or modified ({os.path.getsize(path)} "
                                      f"bytes, metadata.json records {size})")
        differences = model_differences(reader.config, cfg)
    finally:
        reader.close()
    if differences:
        raise CheckpointError(f"--load {root}: the checkpoint holds another model than the flags describe: "
                              f"{'; '.join(differences)} (checkpoint → flags). Pass the checkpoint's values "
                              f"(all are in {os.path.join(reader.dir, fmt.CONFIG)}), or drop --load to start "
                              "a new model")
    _check_optimizer(reader, cfg)


OPTIMIZER_CLASSES = {"adam": "AdamW", "sgd": "SGD"}  # --optimizer -> the torch class a checkpoint records


def _check_optimizer(reader, cfg: Config) -> None:
    """The optimizer state a resume restores must exist and be of this run's optimizer (load.py's checks,
    made before the model is built)."""
    c = cfg.checkpoint
    if c.finetune or c.no_load_optim:
        return
    saved, mine = reader.meta.get("optimizer"), OPTIMIZER_CLASSES.get(cfg.training.optimizer)
    if saved is None:
        raise CheckpointError(f"--load {c.load}: saved without optimizer state (weights only, e.g. converted "
                              "from Hugging Face); add --finetune (weights only, iteration 0) or --no-load-optim")
    if mine is not None and saved != mine:
        raise CheckpointError(f"--load {c.load}: holds {saved} optimizer state, this run uses --optimizer "
                              f"{cfg.training.optimizer} ({mine}); add --no-load-optim, or use the checkpoint's "
                              "optimizer")


def is_hf_folder(path: str) -> bool:
    if not os.path.isfile(os.path.join(path, "config.json")):
        return False
    return any(glob.glob(os.path.join(path, pattern)) for pattern in ("*.safetensors", "pytorch_model*.bin",
                                                                      "*.safetensors.index.json"))


def convert_command(hf_dir: str, cfg: Config) -> str:
    p = cfg.parallel
    out = hf_dir.rstrip("/") + "-megaflow"
    return shlex.join(["python", "tools/checkpoint/convert_from_hf.py", "--load", hf_dir, "--save", out,
                       "--tensor-model-parallel-size", str(p.tensor_model_parallel_size),
                       "--pipeline-model-parallel-size", str(p.pipeline_model_parallel_size)])


def _shape_fields(model: dict, vocab_size) -> list[tuple[str, object]]:
    """(flag, value) of everything that decides the names and global shapes of the parameters."""
    heads = model.get("num_attention_heads")
    head_dim = model.get("kv_channels") or (model.get("hidden_size") // heads if heads else None)
    out = [("--num-layers", model.get("num_layers")), ("--hidden-size", model.get("hidden_size")),
           ("--ffn-hidden-size", model.get("ffn_hidden_size")), ("--num-attention-heads", heads),
           ("--num-query-groups", model.get("num_query_groups")), ("--kv-channels (head dimension)", head_dim),
           ("--normalization", model.get("normalization")), ("--swiglu", model.get("swiglu")),
           ("--disable-bias-linear", not model.get("add_bias_linear")),
           ("--add-qkv-bias", model.get("add_qkv_bias")), ("--qk-layernorm", model.get("qk_layernorm")),
           ("--untie-embeddings-and-output-weights", model.get("untie_embeddings_and_output_weights")),
           ("--position-embedding-type", model.get("position_embedding_type"))]
    if model.get("position_embedding_type") == "learned_absolute":
        out.append(("--max-position-embeddings", model.get("max_position_embeddings")))
    out.append(("vocabulary size (--vocab-size or the tokenizer's)", vocab_size))
    return out


def model_differences(saved: dict, cfg: Config) -> list[str]:
    """`--num-layers 4 → 2` for every shape-deciding setting where the checkpoint and the flags differ.
    Padding is not compared: loading re-pads the vocabulary for any TP size."""
    import dataclasses
    old = _shape_fields(saved.get("model", {}), saved.get("vocab_size"))
    new = _shape_fields(dataclasses.asdict(cfg.model), cfg.vocab_size)
    return [f"{flag} {a} → {b}" for (flag, a), (_f, b) in zip(old, new) if a is not None and a != b]


SCHEDULE_FLAGS = ("train_iters", "train_samples", "lr", "min_lr", "lr_decay_style", "lr_decay_iters",
                  "lr_warmup_iters", "lr_warmup_fraction", "lr_wsd_decay_style", "lr_wsd_decay_iters")


def schedule_changes(saved: dict, cfg: Config) -> str | None:
    """One line naming the schedule flags a resumed run changes (old → new), or None."""
    before, now = saved.get("training", {}), cfg.training
    changed = [f"--{name.replace('_', '-')} {before[name]} → {getattr(now, name)}" for name in SCHEDULE_FLAGS
               if name in before and before[name] != getattr(now, name)]
    if not changed:
        return None
    return ("the schedule differs from the checkpoint's: " + ", ".join(changed) + " (the new values apply; "
            "the learning-rate schedule continues from the checkpoint's step count)")
