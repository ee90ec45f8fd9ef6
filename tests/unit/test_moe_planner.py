"""The planner and MFU for MoE models: parameters per rank at EP/ETP layouts equal a model built on the
meta device, total parameters equal a real model's, active parameters and the FLOPs of an MoE layer
equal what torch's FLOP counter measures on a real forward, model-state bytes equal the optimizer's, and
the step-time model counts the dispatch all-to-alls."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megaflow.config import parse_args, set_vocab_size
from megaflow.layers.moe import MoELayer
from megaflow.model.gpt import GPTModel
from megaflow.model.init import initialize_weights
from megaflow.optim.optimizer import build_optimizer
from megaflow.planner.memory import model_state_bytes
from megaflow.planner.params import total_parameters
from megaflow.training.dry_run import check_parameters, dry_run
from megaflow.training.flops import moe_flops_per_token

BASE = ["--model-style", "llama", "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--num-experts", "8", "--moe-ffn-hidden-size", "24", "--moe-layer-freq",
        "([0]*1+[1]*3)", "--moe-router-enable-expert-bias", "--moe-shared-expert-intermediate-size", "16",
        "--moe-shared-expert-gate", "--vocab-size", "100", "--tokenizer-type", "NullTokenizer", "--mock-data"]


def cfg_of(*extra, world=1):
    cfg = parse_args(BASE + list(extra), world_size=world)
    set_vocab_size(cfg, 101)
    return cfg


@pytest.mark.parametrize("world, flags", [
    (8, ["--expert-model-parallel-size", "4", "--pipeline-model-parallel-size", "2"]),
    (8, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-model-parallel-size", "2"]),
    (8, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-model-parallel-size", "4",
         "--expert-tensor-parallel-size", "1"]),
])
def test_planner_parameters_equal_the_meta_model_at_expert_layouts(world, flags):
    cfg = cfg_of(*flags, world=world)
    for pp_rank in range(cfg.parallel.pipeline_model_parallel_size):
        assert check_parameters(cfg, pp_rank) > 0          # raises when the lists differ
    text = dry_run(cfg)
    assert "active per token" in text and "experts: 8 per MoE layer" in text


def test_total_and_active_parameters_equal_the_real_model():
    cfg = cfg_of()
    model = GPTModel(cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total_parameters(cfg) == trainable
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert total_parameters(cfg, active=True) == trainable - routed * (8 - 2) // 8


def test_moe_layer_flops_equal_the_flop_counter():
    cfg = cfg_of()
    layer = MoELayer(cfg, 1, 0.02)
    initialize_weights(layer, 1)
    x = torch.randn(16, 2, 32)
    with FlopCounterMode(display=False) as counter:
        layer(x)
    assert counter.get_total_flops() == moe_flops_per_token(cfg) * 32


def test_model_state_bytes_equal_the_optimizer_with_experts():
    for flags in ([], ["--use-distributed-optimizer", "--ddp-bucket-size", "3000"]):
        cfg = cfg_of(*flags)
        model = GPTModel(cfg)
        opt = build_optimizer(cfg, model)
        real, planned = opt.memory_bytes(), model_state_bytes(cfg)
        for key in ("parameters", "gradients", "optimizer", "num_parameters", "owned_elements"):
            assert planned[key] == real[key], key


def test_step_time_counts_the_dispatch_all_to_alls():
    """tools/estimate.py's EP term: per MoE layer and micro-batch, forward and backward, the (EP−1)/EP of
    the s·b·k routed token rows that leave the rank and come back; none without EP."""
    from megaflow.planner.perf import Cluster, ep_comm_times, step_time
    cluster = Cluster(gpus=8)
    row = 32 * 4                                                   # hidden 32, fp32
    for ep in (2, 4):
        cfg = cfg_of("--expert-model-parallel-size", str(ep), world=8)
        fwd, bwd = ep_comm_times(cfg, cluster, moe_layers=3)
        tokens = cfg.data.seq_length * cfg.training.micro_batch_size
        one = (ep - 1) / ep * tokens * 2 * row / (cluster.intra_node_gbps * 1e9) + cluster.latency_us * 1e-6
        assert fwd == bwd == pytest.approx(3 * 2 * one)
        assert step_time(cfg, cluster)["ep_comm"] > 0
    assert ep_comm_times(cfg_of(world=8), cluster, moe_layers=3) == (0.0, 0.0)
