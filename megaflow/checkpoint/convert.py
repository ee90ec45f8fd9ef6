"""Checkpoint ⇄ Hugging Face folder, end to end (the logic behind tools/checkpoint/convert_*.py).

    export_to_hf(ckpt_dir, hf_dir, iteration=None, dtype=torch.float32, ...)   any TP/PP/DP/ZeRO layout
    import_from_hf(hf_dir, ckpt_dir, tp=1, pp=1, ...)                          -> checkpoint + config
    training_flags(cfg)   the pretrain_gpt.py flags that rebuild the converted model (to continue
                          pretraining or fine-tune from it with --load DIR --finetune)
"""
from __future__ import annotations

import copy
import os
from typing import Optional

import torch

from megaflow.checkpoint.full_state import load_full_state_dict, save_full_state_dict
from megaflow.checkpoint import hf_deepseek
from megaflow.checkpoint.hf import from_hf_config, from_hf_state_dict, hf_architecture
from megaflow.checkpoint.hf_folder import DEFAULT_MAX_SHARD_BYTES, load_hf_folder, save_hf_folder
from megaflow.config import Config

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def export_to_hf(ckpt_dir: str, hf_dir: str, iteration: Optional[int] = None, dtype=torch.float32,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, tokenizer_model: Optional[str] = None,
                 tokenizer: bool = True, keep_mtp: bool = False) -> dict:
    """Write the HF folder; returns its config.json. tokenizer_model overrides the tokenizer path the
    checkpoint recorded (when the files moved); keep_mtp exports multi-token-prediction layers in
    DeepSeek-V3's layout."""
    cfg, state_dict = load_full_state_dict(ckpt_dir, iteration)
    if tokenizer_model is not None:
        cfg.data.tokenizer_model = tokenizer_model
    return save_hf_folder(cfg, state_dict, hf_dir, DTYPES.get(dtype, dtype), max_shard_bytes, tokenizer, keep_mtp)


def import_from_hf(hf_dir: str, ckpt_dir: str, tp: int = 1, pp: int = 1, iteration: int = 0,
                   make_vocab_size_divisible_by: int = 128, dtype=None) -> Config:
    """Write a megaflow checkpoint (model weights only) at TP=tp, PP=pp; returns its Config. The
    tokenizer is the folder's tokenizer.json when it has one, else a NullTokenizer of the same size."""
    hf_config, hf_sd = load_hf_folder(hf_dir)
    cfg = from_hf_config(hf_config, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        cfg.data.tokenizer_type, cfg.data.tokenizer_model = "HuggingFaceTokenizer", os.path.abspath(hf_dir)
    else:
        cfg.data.tokenizer_type, cfg.data.vocab_size = "NullTokenizer", cfg.vocab_size - 1  # it adds EOD
    if hf_architecture(cfg) == hf_deepseek.DEEPSEEK_V3:  # DeepSeek's MTP modules, when the files hold them
        cfg.model.mtp_num_layers = hf_deepseek.mtp_layers_in(hf_sd, cfg.model.num_layers) or None
    state_dict = from_hf_state_dict(cfg, hf_sd)
    dtype = DTYPES.get(dtype, dtype)
    if dtype is not None:
        state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
    save_full_state_dict(cfg, state_dict, ckpt_dir, tp=tp, pp=pp, iteration=iteration)
    out = copy.deepcopy(cfg)
    out.parallel.tensor_model_parallel_size, out.parallel.pipeline_model_parallel_size = tp, pp
    return out


def training_flags(cfg: Config) -> list[str]:
    """Command-line flags that rebuild exactly this model (and tokenizer, layout) in pretrain_gpt.py.
    The style preset is chosen so that every field can be reached from the command line: the llama
    preset unties embeddings and drops biases, and neither can be switched back by a flag."""
    m, d, p = cfg.model, cfg.data, cfg.parallel
    preset = "llama" if (m.untie_embeddings_and_output_weights and not m.add_bias_linear) else "gpt2"
    flags = ["--model-style", preset, "--num-layers", m.num_layers, "--hidden-size", m.hidden_size,
             "--ffn-hidden-size", m.ffn_hidden_size, "--num-attention-heads", m.num_attention_heads,
             "--normalization", m.normalization, "--position-embedding-type", m.position_embedding_type,
             "--norm-epsilon", m.norm_epsilon, "--rotary-base", m.rotary_base,
             "--max-position-embeddings", m.max_position_embeddings,
             "--make-vocab-size-divisible-by", m.make_vocab_size_divisible_by]
    if m.kv_channels:
        flags += ["--kv-channels", m.kv_channels]
    if m.num_query_groups != m.num_attention_heads:
        flags += ["--group-query-attention", "--num-query-groups", m.num_query_groups]
    if m.swiglu:
        flags += ["--swiglu"]
    flags += [f for f, on in (("--add-qkv-bias", m.add_qkv_bias), ("--qk-layernorm", m.qk_layernorm)) if on]
    if m.multi_latent_attention:
        flags += ["--multi-latent-attention", "--kv-lora-rank", m.kv_lora_rank, "--qk-head-dim", m.qk_head_dim,
                  "--qk-pos-emb-head-dim", m.qk_pos_emb_head_dim, "--v-head-dim", m.v_head_dim]
        flags += ["--q-lora-rank", m.q_lora_rank] if m.q_lora_rank else []
    if m.mtp_num_layers:
        flags += ["--mtp-num-layers", m.mtp_num_layers, "--mtp-loss-scaling-factor", m.mtp_loss_scaling_factor]
    if m.rope_type == "yarn":
        flags += ["--rope-type", "yarn", "--rotary-scaling-factor", m.rotary_scaling_factor,
                  "--original-max-position-embeddings", m.original_max_position_embeddings,
                  "--beta-fast", m.beta_fast, "--beta-slow", m.beta_slow, "--mscale", m.mscale,
                  "--mscale-all-dim", m.mscale_all_dim]
    if preset == "gpt2" and m.untie_embeddings_and_output_weights:
        flags += ["--untie-embeddings-and-output-weights"]
    if preset == "gpt2" and not m.add_bias_linear:
        flags += ["--disable-bias-linear"]
    if cfg.moe.num_experts is not None:
        e = cfg.moe
        flags += ["--num-experts", e.num_experts, "--moe-ffn-hidden-size", e.moe_ffn_hidden_size,
                  "--moe-router-topk", e.moe_router_topk, "--moe-layer-freq", e.moe_layer_freq]
        flags += ["--moe-router-score-function", e.moe_router_score_function]
        flags += ["--moe-router-pre-softmax"] if e.moe_router_pre_softmax else []
        flags += ["--moe-router-enable-expert-bias"] if e.moe_router_enable_expert_bias else []
        for flag, value in (("--moe-router-num-groups", e.moe_router_num_groups),
                            ("--moe-router-group-topk", e.moe_router_group_topk),
                            ("--moe-router-topk-scaling-factor", e.moe_router_topk_scaling_factor),
                            ("--moe-shared-expert-intermediate-size", e.moe_shared_expert_intermediate_size)):
            flags += [flag, value] if value is not None else []
    if d.tokenizer_type == "NullTokenizer":
        flags += ["--tokenizer-type", "NullTokenizer", "--vocab-size", d.vocab_size]
    else:
        flags += ["--tokenizer-type", d.tokenizer_type, "--tokenizer-model", d.tokenizer_model]
    flags += ["--tensor-model-parallel-size", p.tensor_model_parallel_size,
              "--pipeline-model-parallel-size", p.pipeline_model_parallel_size]
    if p.tensor_model_parallel_size > 1 and (p.sequence_parallel or cfg.moe.num_experts is not None):
        flags += ["--sequence-parallel"]  # MoE layers at TP > 1 need it
    return [str(f) for f in flags]
