"""Checkpoints as whole tensors in one process: read every global tensor, write them at any layout.

    read_all(root, iteration)  -> (cfg, metadata, {key: global tensor})      model and optimizer state
    target_config(cfg, tp, pp, dp, distributed_optimizer) -> cfg of the new layout (vocabulary re-padded)
    write_layout(root, iteration, cfg, tensors, metadata, tp, pp, dp, distributed_optimizer)
    reshard(load, save, tp, pp, dp=1, distributed_optimizer=False, iteration=None) -> target cfg

write_layout writes the files the ranks of a TP×PP×DP run would own: model shards on DP rank 0
(replicated tensors on TP rank 0), optimizer state on DP rank 0, or, with the distributed optimizer,
each parameter's flattened TP shard cut into DP equal ranges, one per DP rank. Loading re-splits from the
index anyway (checkpoint/load.py), so these ranges need not match a run's bucket layout: the point is
that each rank's file holds about what that rank loads. No RNG state is written (streams belong to the
ranks of the saving layout): a run loading the result re-seeds and says so.
Everything is held in memory at once: this is the offline tool's simple form, for CPU machines with
room for the model and its optimizer state (tools/checkpoint/reshard.py).
"""
from __future__ import annotations

import copy
import os
import re

import torch

from megaflow.checkpoint import format as fmt
from megaflow.config import Config, pad_vocab_size, validate
from megaflow.layers.sharding import shard

_LAYER = re.compile(r"^layers\.(\d+)\.")


def read_all(root: str, iteration: int | None = None, kinds=None) -> tuple[Config, dict, dict]:
    """(cfg, metadata, {"{kind}/{name}": global tensor}) for every tensor (of `kinds`, default all)."""
    reader = fmt.CheckpointReader(root, iteration)
    try:
        keys = [k for k in reader.index if kinds is None or k.split("/", 1)[0] in kinds]
        return Config.from_dict(reader.config), reader.meta, {k: reader.assemble(k) for k in keys}
    finally:
        reader.close()


def target_config(cfg: Config, tp: int, pp: int, dp: int = 1, distributed_optimizer: bool = False) -> Config:
    """The configuration at another layout; model-related conditions (heads, groups and FFN divisible
    by TP, the layer split over PP) are validated. The interleaved schedule and an uneven split are
    dropped when PP changes (they describe the saving run; a loading run gives its own flags)."""
    cfg = copy.deepcopy(cfg)
    p = cfg.parallel
    if pp != p.pipeline_model_parallel_size or pp == 1:
        p.num_layers_per_virtual_pipeline_stage = None
        p.decoder_first_pipeline_num_layers = p.decoder_last_pipeline_num_layers = None
    p.tensor_model_parallel_size, p.pipeline_model_parallel_size = tp, pp
    p.use_distributed_optimizer = distributed_optimizer
    p.overlap_param_gather = p.overlap_param_gather and distributed_optimizer  # only exists with ZeRO
    cfg.world_size = tp * pp
    offline_expert_layout(cfg)
    validate(cfg)
    cfg.world_size, cfg.data_parallel_size = tp * pp * dp, dp
    cfg.padded_vocab_size = pad_vocab_size(cfg.vocab_size, cfg.model.make_vocab_size_divisible_by, tp)
    return cfg


def offline_expert_layout(cfg: Config) -> None:
    """Files written offline hold every expert on EP rank 0 (loading at any EP picks experts by their
    global names); MoE layers at TP > 1 run with sequence parallelism, which does not change storage."""
    p = cfg.parallel
    p.expert_model_parallel_size = 1
    if cfg.moe.num_experts is not None and p.tensor_model_parallel_size > 1:
        p.sequence_parallel = True


def parameter_layout(cfg: Config) -> dict:
    """{global name: meta parameter} of the full model: .shape (padded vocabulary) and its TP sharding."""
    from megaflow.model import GPTModel  # the model defines which parameters exist and how they shard
    from megaflow.parallel import state
    saved = state._STATE
    state._STATE = state.ParallelState(device=torch.device("meta"))  # layers take their device from here
    try:
        return dict(GPTModel(cfg).named_parameters())
    finally:
        state._STATE = saved


def pipeline_stage(cfg: Config, name: str) -> int:
    """The pipeline rank holding global parameter `name` (any virtual chunk of it)."""
    from megaflow.model import stage_layer_numbers
    from megaflow.config import virtual_pipeline_size
    pp = cfg.parallel.pipeline_model_parallel_size
    match = _LAYER.match(name)
    if match is None:
        return 0 if name.startswith(("word_embeddings.", "position_embeddings.")) else pp - 1
    layer = int(match.group(1))
    for r in range(pp):
        if any(layer in stage_layer_numbers(cfg, r, pp, v) for v in range(virtual_pipeline_size(cfg))):
            return r
    raise fmt.CheckpointError(f"layer {layer} is on no pipeline stage")


def write_layout(root: str, iteration: int, cfg: Config, tensors: dict, metadata: dict, tp: int, pp: int,
                 dp: int = 1, distributed_optimizer: bool = False) -> str:
    """Write `tensors` ({"{kind}/{name}": global tensor}, vocabulary padded for cfg) as a checkpoint of
    the layout; metadata supplies iteration-independent fields (consumed_samples, scheduler, ...)."""
    layout = parameter_layout(cfg)
    model_names = {k.split("/", 1)[1] for k in tensors if k.startswith(fmt.MODEL + "/")}
    if model_names != set(layout):
        missing, unexpected = sorted(set(layout) - model_names), sorted(model_names - set(layout))
        raise fmt.CheckpointError(f"the tensors do not match the model of the config: missing {missing}, "
                                  f"unexpected {unexpected}")
    files: dict[tuple, dict] = {}
    indices: dict[tuple, dict] = {}
    for key, full in tensors.items():
        kind, name = key.split("/", 1)
        param = layout[name]
        if list(full.shape) != list(param.shape):
            raise fmt.CheckpointError(f"{key}: shape {list(full.shape)}, the config implies {list(param.shape)}")
        sharding = fmt.sharding_of(param)
        tp_sharded = sharding["tensor_parallel"] and tp > 1
        p_rank = pipeline_stage(cfg, name)
        for t in range(tp if tp_sharded else 1):
            local = shard(full, param.partition_dim, t, tp, param.fused_sizes) if tp_sharded else full
            n = local.numel()
            if kind == fmt.MODEL or not distributed_optimizer:
                ranges = {0: (0, n)}
            else:
                ranges = {d: (d * n // dp, (d + 1) * n // dp) for d in range(dp)}
            for d, (lo, hi) in ranges.items():
                if lo == hi:
                    continue
                rank = (t, p_rank, d)
                data = local if kind == fmt.MODEL else local.reshape(-1)[lo:hi]
                files.setdefault(rank, {})[key] = data.detach().clone().contiguous()
                indices.setdefault(rank, {})[key] = fmt.piece_entry(sharding, full.dtype, full.shape, local.shape,
                                                                    t, tp, lo, hi)
    tmp = fmt.prepare_tmp_dir(root, iteration, cfg.to_json())
    sizes = {}
    for (t, p_rank, d), rank_tensors in sorted(files.items()):
        fname = fmt.rank_file_name(t, p_rank, d)
        header = {"tp_rank": t, "pp_rank": p_rank, "dp_rank": d, "written_by": "megaflow.checkpoint.reshard"}
        sizes[fname] = fmt.write_rank_file(os.path.join(tmp, fname), rank_tensors, header)
    meta = dict(metadata, format=fmt.FORMAT, iteration=iteration, rng=False, files=sizes,
                tensors=fmt.merge_indices({fmt.rank_file_name(*r): i for r, i in indices.items()}),
                layout={"tp": tp, "pp": pp, "dp": dp, "vpp": 1, "world_size": tp * pp * dp,
                        "distributed_optimizer": distributed_optimizer})
    meta.setdefault("scalars", {})
    return fmt.finalize(root, iteration, meta)


def repad(cfg: Config, tensors: dict, rows: int) -> dict:
    """Vocabulary tensors (model and optimizer state) padded to `rows` (format.fit_vocab_rows)."""
    out = {}
    for key, full in tensors.items():
        name = key.split("/", 1)[1]
        is_vocab = name in ("word_embeddings.weight", "output_layer.weight")
        out[key] = fmt.fit_vocab_rows(full, rows, cfg.vocab_size, key) if is_vocab else full
    return out


def reshard(load: str, save: str, tp: int, pp: int, dp: int = 1, distributed_optimizer: bool = False,
            iteration: int | None = None) -> Config:
    """Rewrite a checkpoint (model, optimizer state, data position, schedule) at another layout."""
    cfg, meta, tensors = read_all(load, iteration)
    out_cfg = target_config(cfg, tp, pp, dp, distributed_optimizer)
    keep = {k: meta.get(k) for k in ("consumed_samples", "optimizer", "scheduler", "loss_scaler", "extra", "scalars")}
    write_layout(save, meta["iteration"], out_cfg, repad(cfg, tensors, out_cfg.padded_vocab_size), keep,
                 tp, pp, dp, distributed_optimizer)
    return out_cfg
