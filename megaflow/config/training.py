"""Optimization, precision, schedules, evaluation; checkpointing and logging."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megaflow.config.fields import _f


@dataclass
class TrainingConfig:
    micro_batch_size: int = _f(4, "samples per micro-batch per DP rank")
    global_batch_size: Optional[int] = _f(None, "samples per step (default micro × DP)")
    train_iters: Optional[int] = _f(None, "optimizer steps")
    train_samples: Optional[int] = _f(None, "samples to train on (alternative to --train-iters)")
    exit_interval: Optional[int] = _f(None, "stop (after saving) when iteration % N == 0")
    seed: int = _f(1234, "random seed")
    optimizer: str = _f("adam", "AdamW, SGD, or Muon (orthogonalised updates for 2-D hidden weights, AdamW for "
                                "the rest)", choices=["adam", "sgd", "muon"])
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
    muon_momentum: float = _f(0.9, "Muon momentum factor")
    muon_use_nesterov: bool = _f(False, "Nesterov-style momentum in Muon", action="store_true")
    muon_split_qkv: bool = _f(True, "orthogonalise the Q, K and V blocks of the fused QKV weight separately",
                              flag="--muon-no-split-qkv", action="store_false")
    muon_scale_mode: str = _f("spectral", "Muon update scale: spectral sqrt(max(m,n)), unit_rms_norm "
                                          "sqrt(m/n), shape_scaling sqrt(max(1,m/n))",
                              choices=["spectral", "unit_rms_norm", "shape_scaling"])
    muon_fp32_matmul_prec: str = _f("medium", "Newton-Schulz matmul precision: low/medium in bf16, high in fp32",
                                    choices=["low", "medium", "high"])
    muon_num_ns_steps: int = _f(5, "Newton-Schulz iterations")
    muon_extra_scale_factor: float = _f(1.0, "extra factor on the Muon update")
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
    wandb_project: Optional[str] = _f(None, "log the TensorBoard scalars to this Weights & Biases project too "
                                            "(needs the wandb package: pip install megaflow[wandb]; "
                                            "WANDB_MODE=offline writes local files only)")
    wandb_exp_name: Optional[str] = _f(None, "the W&B run name")
    wandb_save_dir: Optional[str] = _f(None, "where W&B writes its files (default: --save/wandb, else ./wandb)")
