"""Parallel layout: TP, PP (and its virtual stages), DP/ZeRO, the process-group backend."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megaflow.config.fields import _f


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = _f(1, "tensor-parallel size (TP)")
    pipeline_model_parallel_size: int = _f(1, "pipeline-parallel size (PP)")
    context_parallel_size: int = _f(1, "context-parallel size (CP): each sequence split over CP ranks")
    cp_comm_type: str = _f("p2p", "how attention crosses the CP ranks: p2p (ring of K/V, overlapped), "
                                  "a2a (all-to-all over heads), all_gather (gather K/V)",
                           choices=["p2p", "a2a", "all_gather"])
    expert_model_parallel_size: int = _f(1, "expert-parallel size (EP): MoE experts split over EP ranks, "
                                            "carved out of TP×CP×DP")
    expert_tensor_parallel_size: Optional[int] = _f(None, "tensor-parallel size inside each expert (ETP, "
                                                          "default TP)")
    sequence_parallel: bool = _f(False, "shard norms/dropout along the sequence (needs TP>1)",
                                 action="store_true")
    num_layers_per_virtual_pipeline_stage: Optional[int] = _f(None, "layers per interleaved chunk")
    decoder_first_pipeline_num_layers: Optional[int] = _f(None, "layers on the first pipeline stage")
    decoder_last_pipeline_num_layers: Optional[int] = _f(None, "layers on the last pipeline stage")
    use_distributed_optimizer: bool = _f(False, "ZeRO: shard optimizer state across DP", action="store_true")
    overlap_grad_reduce: bool = _f(False, "overlap DP gradient reduction with backward", action="store_true")
    overlap_param_gather: bool = _f(False, "overlap parameter all-gather with forward", action="store_true")
    zero_stage: int = _f(1, "with --use-distributed-optimizer: 1 shards optimizer state (gradients "
                            "reduce-scattered once per step), 2 also gradients (reduce-scattered every "
                            "micro-batch), 3 also parameters (gathered per layer)", choices=[1, 2, 3])
    data_parallel_sharding_strategy: Optional[str] = _f(
        None, "Megatron's name for the same setting: no_shard, optim (ZeRO-1), optim_grads (ZeRO-2), "
              "optim_grads_params (ZeRO-3); implies --use-distributed-optimizer unless no_shard",
        choices=["no_shard", "optim", "optim_grads", "optim_grads_params"])
    reshard_after_forward: bool = _f(True, "ZeRO-3: free a layer's gathered parameters after its forward and "
                                           "gather them again for its backward; --no-reshard-after-forward "
                                           "keeps them from forward to backward (one gather fewer per layer "
                                           "and micro-batch; under PP the stage's layers stay whole through "
                                           "the warm-up)", flag="--no-reshard-after-forward", action="store_false")
    ddp_bucket_size: Optional[int] = _f(None, "elements per gradient-reduction bucket (default 40M)")
    distributed_backend: Optional[str] = _f(None, "default: nccl with CUDA, else gloo", choices=["nccl", "gloo"])
    distributed_timeout_minutes: float = _f(10.0, "collective timeout")
    dry_run_world_size: Optional[int] = _f(None, "with --dry-run: the world size to plan for (default: "
                                                 "$WORLD_SIZE, as torchrun sets it)", flag="--world-size")
