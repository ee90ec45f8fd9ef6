"""The run planner against megaflow itself, in one process: parameter lists against built models (real
and meta, any TP/PP/interleaving), model-state bytes against what the engine allocates after a step,
and activation bytes against autograd's saved tensors measured over a training step (CPU kernels, fp32
and bf16 autocast, dropout, every recompute mode). TP/SP and pipeline schedules: tests/distributed/
test_planner_layouts.py."""
import itertools

import pytest
import torch

from megaflow.config import config_from_kwargs, set_vocab_size
from megaflow.model import build_model
from megaflow.optim.optimizer import build_optimizer
from megaflow.pipeline.schedules import forward_backward_no_pipelining
from megaflow.planner.activations import stage_activation_bytes
from megaflow.planner.measure import allocated_model_state_bytes, measure_step
from megaflow.planner.memory import model_state_bytes
from megaflow.planner.params import total_parameters
from megaflow.training.dry_run import check_parameters
from megaflow.training.step import autocast_context, train_step

VOCAB = 500


def make_cfg(style="llama", world_size=1, **kw):
    args = dict(model_style=style, num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=32,
                vocab_size=VOCAB, hidden_dropout=0.1, attention_dropout=0.1, micro_batch_size=2)
    if style == "llama":
        args.update(group_query_attention=True, num_query_groups=2)
    if style in ("moe", "moe_gg"):   # a leading dense layer, then MoE layers (issue 17)
        args.update(model_style="llama", num_experts=4, moe_ffn_hidden_size=48, moe_router_topk=2,
                    moe_aux_loss_coeff=0.01, moe_layer_freq="([0]*1+[1]*3)")
    if style in ("moe_cap", "moe_cap_pad"):   # a capacity dropping tokens (0.5), or padding up to it (1.5)
        args.update(model_style="llama", num_experts=4, moe_ffn_hidden_size=48, moe_router_topk=2,
                    moe_layer_freq="1", moe_grouped_gemm=True, moe_expert_capacity_factor=0.5)
        if style == "moe_cap_pad":
            args.update(moe_expert_capacity_factor=1.5, moe_pad_expert_input_to_capacity=True)
    if style == "moe_gg":   # grouped GEMM, sigmoid router with expert bias, a gated shared expert
        args.update(moe_grouped_gemm=True, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                    moe_shared_expert_intermediate_size=32, moe_shared_expert_gate=True)
    if style == "mtp":   # two multi-token-prediction modules after a Llama
        args.update(model_style="llama", group_query_attention=True, num_query_groups=2, mtp_num_layers=2)
    if style == "mla":   # DeepSeek-V3's attention; its value heads narrower than its query/key heads
        args.update(model_style="llama", multi_latent_attention=True, q_lora_rank=24, kv_lora_rank=16,
                    qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=12)
    args.update(kw)
    cfg = config_from_kwargs(world_size=world_size, **args)
    set_vocab_size(cfg, VOCAB)
    return cfg


def batches(cfg, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, b = cfg.data.seq_length, cfg.training.micro_batch_size
    return [{"tokens": torch.randint(0, VOCAB, (b, s), generator=g),
             "labels": torch.randint(0, VOCAB, (b, s), generator=g), "loss_mask": torch.ones(b, s),
             "position_ids": torch.arange(s).repeat(b, 1)} for _ in range(m)]


LAYOUTS = [dict(), dict(tensor_model_parallel_size=2), dict(tensor_model_parallel_size=2, sequence_parallel=True, num_layers=6, pipeline_model_parallel_size=3),
           dict(pipeline_model_parallel_size=2), dict(pipeline_model_parallel_size=4),
           dict(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1, global_batch_size=8),
           dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, decoder_first_pipeline_num_layers=1)]


@pytest.mark.parametrize("style,tied", [("gpt2", None), ("llama", None), ("llama", False), ("mla", None),
                                        ("mtp", None), ("mtp", False)])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: "-".join(f"{k[:6]}{v}" for k, v in d.items()) or "1")
def test_parameter_lists_match_models_built_on_the_meta_device(style, tied, layout):
    world = layout.get("tensor_model_parallel_size", 1) * layout.get("pipeline_model_parallel_size", 1) * 2
    extra = {} if tied is None else {"untie_embeddings_and_output_weights": tied}
    cfg = make_cfg(style, world_size=world, **layout, **extra)
    for r in range(cfg.parallel.pipeline_model_parallel_size):
        assert check_parameters(cfg, r) > 0  # raises, naming both lists, when they differ


@pytest.mark.parametrize("style", ["gpt2", "llama", "mla", "mtp"])
def test_parameter_count_and_list_match_a_real_model(style):
    cfg = make_cfg(style)
    model = build_model(cfg)
    assert total_parameters(cfg) == sum(p.numel() for p in model.parameters())
    assert check_parameters(cfg, 0) == sum(p.numel() for p in model.parameters())
    # Across PP the tied embedding's copy on the last stage is not a new parameter.
    assert total_parameters(make_cfg(style, world_size=2, pipeline_model_parallel_size=2)) == total_parameters(cfg)


@pytest.mark.parametrize("style,optimizer,precision", [("gpt2", "adam", "fp32"), ("llama", "adam", "bf16 autocast"),
                                                       ("llama", "adam", "bf16 params"), ("llama", "sgd", "fp32"),
                                                       ("mla", "adam", "bf16 autocast")])
def test_model_state_bytes_equal_what_the_engine_allocates(style, optimizer, precision):
    cfg = make_cfg(style, optimizer=optimizer, global_batch_size=4, ddp_bucket_size=4000, **PRECISION[precision])
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    train_step(cfg, model, opt, None, iter(batches(cfg, 2)), 2)
    allocated = allocated_model_state_bytes(model, opt)
    predicted = model_state_bytes(cfg)
    for key in ("parameters", "gradients", "optimizer"):
        assert predicted[key] == allocated[key], key


GRID = list(itertools.product(["gpt2", "llama"], [0.0, 0.1],
                              [None, "selective", "full", "full-2", "block-2"], ["fp32"]))
GRID += [(style, drop, rc, precision) for style, drop, rc, precision in itertools.product(
    ["gpt2", "llama"], [0.0, 0.1], [None, "selective", "full"], ["bf16 autocast", "bf16 params"])]
GRID += list(itertools.product(["mla"], [0.0, 0.1], [None, "selective", "full"], ["fp32", "bf16 autocast"]))
GRID += list(itertools.product(["mtp"], [0.0, 0.1], [None, "full"], ["fp32", "bf16 autocast"]))
GRID += list(itertools.product(["moe", "moe_gg"], [0.0, 0.1], [None, "selective", "full"], ["fp32", "bf16 autocast"]))
GRID += list(itertools.product(["moe_cap", "moe_cap_pad"], [0.0], [None, "full"], ["fp32", "bf16 autocast"]))
PRECISION = {"fp32": {}, "bf16 autocast": {"bf16": True},
             "bf16 params": {"bf16": True, "low_precision_params": True}}


def _recompute(rc):
    if rc is None or rc == "selective":
        return dict(recompute_granularity=rc)
    kind, _, k = rc.partition("-")
    return dict(recompute_granularity="full", recompute_method="block" if kind == "block" else "uniform",
                recompute_num_layers=int(k or 1))


@pytest.mark.parametrize("style,dropout,recompute,precision", GRID)
def test_activation_peak_of_a_step_matches_the_formula(style, dropout, recompute, precision):
    cfg = make_cfg(style, hidden_dropout=dropout, attention_dropout=dropout, global_batch_size=4,
                   **PRECISION[precision], **_recompute(recompute))
    model = build_model(cfg)
    measured = measure_step(model, batches(cfg, 2), forward_backward_no_pipelining, 2,
                            autocast_ctx=autocast_context(cfg))
    predicted = stage_activation_bytes(cfg, 0, "cpu")["peak"]
    assert measured["still_live"] == 0
    assert abs(predicted / measured["peak"] - 1) < 0.02, (predicted, measured["peak"])


def test_recompute_and_sequence_length_move_the_estimate_the_way_the_measurement_moves():
    base = make_cfg("llama", global_batch_size=2)
    full = make_cfg("llama", global_batch_size=2, recompute_granularity="full")
    longer = make_cfg("llama", global_batch_size=2, seq_length=64)
    pred = {name: stage_activation_bytes(c, 0)["peak"] for name, c in
            [("base", base), ("full", full), ("longer", longer)]}
    assert pred["full"] < 0.5 * pred["base"]
    assert pred["longer"] > 2 * pred["base"]  # the attention math path's s² terms
