"""The GPT model (math in gpt.py) and its layout-independent initialisation (init.py)."""
import torch
from torch import nn

from megaflow.config import Config, virtual_pipeline_size
from megaflow.model.compile import compile_blocks
from megaflow.model.gpt import GPTModel, stage_layer_numbers
from megaflow.model.init import global_named_parameters, initialize_weights
from megaflow.parallel import state

__all__ = ["GPTModel", "build_model", "global_named_parameters", "initialize_weights", "stage_layer_numbers"]


def build_model(cfg: Config) -> GPTModel | nn.ModuleList:
    """This rank's pipeline stage of the model, initialised from cfg.training.seed.

    With the interleaved schedule (--num-layers-per-virtual-pipeline-stage) the stage is V model chunks,
    returned as an nn.ModuleList (chunk v = virtual stage v·PP + pp_rank); the embedding lives in the
    first rank's chunk 0 and the output layer in the last rank's chunk V − 1. Otherwise one GPTModel."""
    st = state.get()
    v_size = virtual_pipeline_size(cfg)
    chunks = []
    for v in range(v_size):
        chunks.append(GPTModel(cfg, pre_process=st.is_first_stage and v == 0,
                               post_process=st.is_last_stage and v == v_size - 1,
                               layer_numbers=stage_layer_numbers(cfg, st.pp_rank, st.pp_size, v)))
    model = chunks[0] if v_size == 1 else nn.ModuleList(chunks)
    initialize_weights(model, cfg.training.seed)
    if cfg.training.low_precision_params:  # fp32 main copies live in the optimizer (optim/)
        model.to(torch.bfloat16 if cfg.training.bf16 else torch.float16)
    if cfg.performance.compile:
        compile_blocks(model, cfg)
    return model
