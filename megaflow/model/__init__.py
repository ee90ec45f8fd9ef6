"""The GPT model (math in gpt.py) and its layout-independent initialisation (init.py)."""
import torch

from megaflow.config import Config
from megaflow.model.gpt import GPTModel, stage_layer_numbers
from megaflow.model.init import global_named_parameters, initialize_weights
from megaflow.parallel import state

__all__ = ["GPTModel", "build_model", "global_named_parameters", "initialize_weights", "stage_layer_numbers"]


def build_model(cfg: Config) -> GPTModel:
    """This rank's pipeline stage of the model, initialised from cfg.training.seed."""
    st = state.get()
    model = GPTModel(cfg, pre_process=st.is_first_stage, post_process=st.is_last_stage,
                     layer_numbers=stage_layer_numbers(cfg, st.pp_rank, st.pp_size))
    initialize_weights(model, cfg.training.seed)
    if cfg.training.low_precision_params:  # fp32 main copies live in the optimizer (optim/)
        model.to(torch.bfloat16 if cfg.training.bf16 else torch.float16)
    return model
