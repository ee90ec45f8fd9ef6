"""Worker for test_planner_layouts.py (2 gloo ranks): each rank measures the activation peak of one
training step (autograd's saved tensors, planner/measure.py) at TP = 2 (with and without sequence
parallelism) and in PP = 2 schedules (1F1B, interleaved), and the model-state bytes the optimizer
allocates, next to the planner's predictions for that rank. Results: OUT_DIR/<name>_rank<r>.json."""
import json
import os
import sys

import torch
import torch.distributed as dist

from megaflow.config import config_from_kwargs, set_vocab_size, virtual_pipeline_size
from megaflow.model import build_model
from megaflow.optim.optimizer import build_optimizer
from megaflow.parallel import state
from megaflow.pipeline import schedules
from megaflow.planner.activations import stage_activation_bytes
from megaflow.planner.measure import allocated_model_state_bytes, measure_step
from megaflow.planner.memory import model_state_bytes
from megaflow.training.step import autocast_context, train_step

VOCAB = 500
MLA = dict(multi_latent_attention=True, q_lora_rank=24, kv_lora_rank=16, qk_head_dim=16, qk_pos_emb_head_dim=8,
           v_head_dim=12)   # DeepSeek-V3's attention (replicated latents, column-parallel up-projections)
MOE = dict(num_experts=4, moe_ffn_hidden_size=48, moe_router_topk=2, moe_aux_loss_coeff=0.01,
           moe_layer_freq="([0]*1+[1]*3)")   # issue 17: activations of MoE layers, balanced load assumed
CONFIGS = {
    "tp_gpt2": dict(model_style="gpt2", tensor_model_parallel_size=2),
    "tp_gpt2_sp_selective": dict(model_style="gpt2", tensor_model_parallel_size=2, sequence_parallel=True,
                                 recompute_granularity="selective"),
    "tp_llama_sp_full": dict(model_style="llama", tensor_model_parallel_size=2, sequence_parallel=True,
                             recompute_granularity="full"),
    "tp_llama_nodrop": dict(model_style="llama", tensor_model_parallel_size=2, hidden_dropout=0.0,
                            attention_dropout=0.0),
    "tp_llama_bf16": dict(model_style="llama", tensor_model_parallel_size=2, bf16=True),
    "tp_gpt2_sp_bf16": dict(model_style="gpt2", tensor_model_parallel_size=2, sequence_parallel=True, bf16=True),
    "dp_zero2_buckets": dict(model_style="llama", use_distributed_optimizer=True, ddp_bucket_size=5000,
                             global_batch_size=4),
    "dp_zero1_bf16_params": dict(model_style="gpt2", use_distributed_optimizer=True, zero_stage=1, bf16=True,
                                 low_precision_params=True, ddp_bucket_size=3000, global_batch_size=4),
    "dp_plain_bf16_params": dict(model_style="llama", bf16=True, low_precision_params=True, global_batch_size=4),
    "pp_gpt2_1f1b": dict(model_style="gpt2", pipeline_model_parallel_size=2, global_batch_size=8),
    "pp_llama_1f1b_full": dict(model_style="llama", pipeline_model_parallel_size=2, global_batch_size=6,
                               recompute_granularity="full"),
    "pp_llama_interleaved": dict(model_style="llama", pipeline_model_parallel_size=2, global_batch_size=8,
                                 num_layers_per_virtual_pipeline_stage=1, recompute_granularity="selective"),
    "tp_mla_sp": dict(model_style="llama", tensor_model_parallel_size=2, sequence_parallel=True, **MLA),
    "tp_mla_bf16": dict(model_style="llama", tensor_model_parallel_size=2, bf16=True, hidden_dropout=0.0,
                        attention_dropout=0.0, **MLA),
    "tp_moe_sp": dict(model_style="llama", tensor_model_parallel_size=2, sequence_parallel=True, **MOE),
    "ep_moe_gg": dict(model_style="llama", expert_model_parallel_size=2, moe_grouped_gemm=True, global_batch_size=4,
                      **MOE),
}


def make_cfg(**kw):
    args = dict(num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=VOCAB,
                hidden_dropout=0.1, attention_dropout=0.1, micro_batch_size=2, seed=3)
    if kw.get("model_style") == "llama" and not kw.get("multi_latent_attention"):
        args.update(group_query_attention=True, num_query_groups=2)
    args.update(kw)
    cfg = config_from_kwargs(world_size=int(os.environ["WORLD_SIZE"]), **args)
    set_vocab_size(cfg, VOCAB)
    return cfg


def batches(cfg, m):
    g = torch.Generator().manual_seed(5)
    s, b = cfg.data.seq_length, cfg.training.micro_batch_size
    return [{"tokens": torch.randint(0, VOCAB, (b, s), generator=g),
             "labels": torch.randint(0, VOCAB, (b, s), generator=g), "loss_mask": torch.ones(b, s),
             "position_ids": torch.arange(s).repeat(b, 1)} for _ in range(m)]


def run(name, out):
    cfg = make_cfg(**CONFIGS[name])
    p = cfg.parallel
    st = state.initialize(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, backend="gloo",
                          timeout_minutes=2.0, device="cpu", virtual_pp=virtual_pipeline_size(cfg),
                          ep=p.expert_model_parallel_size, etp=p.expert_tensor_parallel_size)
    m = cfg.training.global_batch_size // (cfg.training.micro_batch_size * cfg.data_parallel_size)
    model = build_model(cfg)
    measured = measure_step(model, batches(cfg, m), schedules.get_forward_backward_func(), m,
                            autocast_ctx=autocast_context(cfg))
    predicted = stage_activation_bytes(cfg, st.pp_rank, "cpu")
    optimizer = build_optimizer(cfg, model)
    train_step(cfg, model, optimizer, None, iter(batches(cfg, m)), m)
    result = {"pp_rank": st.pp_rank, "measured": measured["peak"], "predicted": predicted["peak"],
              "in_flight": predicted["in_flight"], "states": allocated_model_state_bytes(model, optimizer),
              "predicted_states": model_state_bytes(cfg, st.pp_rank, st.dp_rank)}
    with open(os.path.join(out, f"{name}_rank{dist.get_rank()}.json"), "w") as fh:
        json.dump(result, fh)


def main():
    out = sys.argv[1]
    for name in CONFIGS:
        run(name, out)
    state.destroy()


if __name__ == "__main__":
    main()
