"""pretrain(cfg): set up the process groups, data, model and optimizer, then the training loop with
evaluation, logging, checkpointing, NaN detection, early stopping and --exit-interval."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from megaflow.checkpoint import CheckpointWriter, load_checkpoint
from megaflow.checkpoint.rng import set_rng_state
from megaflow.config import Config, format_config, num_microbatches, set_vocab_size, virtual_pipeline_size
from megaflow.data import build_data_loader, build_tokenizer, build_train_valid_test_datasets
from megaflow.model import build_model
from megaflow.model.compile import compile_seconds
from megaflow.optim.loss_scaler import build_loss_scaler
from megaflow.optim.lr_scheduler import build_lr_scheduler
from megaflow.optim.optimizer import build_optimizer
from megaflow.parallel import flight_recorder, health, state
from megaflow.parallel.random import model_parallel_seed
from megaflow.pipeline.timeline import TimelineRecorder
from megaflow.layers.moe import collect_stats as collect_moe_stats
from megaflow.training.mtp_stats import collect_stats as collect_mtp_losses
from megaflow.training import logging as log
from megaflow.training import restart
from megaflow.training.faults import Faults
from megaflow.training.flops import device_peak_tflops, flops_per_iteration
from megaflow.training.memory import memory_report
from megaflow.training.preflight import schedule_changes
from megaflow.training.step import evaluate, train_step
from megaflow.training.stragglers import StragglerDetector
from megaflow.training.wandb_writer import ScalarWriters


class TrainingError(RuntimeError):
    """A run that cannot continue (NaN loss, ...); the message says why and what was kept."""


@dataclass
class TrainResult:
    iteration: int = 0
    consumed_samples: int = 0
    losses: dict = field(default_factory=dict)        # iteration -> lm loss (logging rank)
    moe_stats: dict = field(default_factory=dict)     # iteration -> MoE statistics of the log line
    mtp_losses: dict = field(default_factory=dict)    # iteration -> each MTP module's loss (log line)
    valid_losses: dict = field(default_factory=dict)  # iteration -> validation loss
    skipped_iterations: int = 0
    stopped_early: bool = False
    last_checkpoint: str | None = None


def set_seed(seed: int) -> None:
    # Different pipeline stages hold different layers: give each its own dropout stream (as Megatron).
    seed = seed + 100 * state.get().pp_rank
    random.seed(seed)
    np.random.seed(seed)
    model_parallel_seed(seed)  # default generator = seed; TP dropout stream = seed + 2718 + tp_rank


def reseed_value(seed: int, iteration: int) -> int:
    """The seed of a run resumed at another layout (its RNG streams cannot be restored): deterministic,
    and not the first run's, so dropout does not replay the masks of the run's first iterations."""
    return (seed + 1_000_003 * iteration) % 2**31


def _most_on_any_rank(value: int) -> int:
    """The largest value any rank has (decisions that need the last stage's loss)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([float(value)], device=state.get().device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any."""
    return bool(_most_on_any_rank(int(flag)))


NAN, SPIKE = 2, 1  # loss verdicts, worst first


def _fresh_window() -> dict:
    """Sums over the iterations since the last log line."""
    return {"loss": 0.0, "n": 0, "time": 0.0, "iters": 0, "nan": 0, "skipped": 0}


def train_iterations(cfg: Config) -> int:
    t = cfg.training
    if t.train_iters is not None:
        return t.train_iters
    if t.train_samples is not None:
        return t.train_samples // t.global_batch_size
    raise TrainingError("give --train-iters or --train-samples")


class _Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        p = cfg.parallel
        self.st = state.initialize(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                   backend=p.distributed_backend, timeout_minutes=p.distributed_timeout_minutes,
                                   device=cfg.training.device, virtual_pp=virtual_pipeline_size(cfg),
                                   cp=p.context_parallel_size, ep=p.expert_model_parallel_size,
                                   etp=p.expert_tensor_parallel_size)
        flight_recorder.get().resize(cfg.resilience.flight_recorder_size)
        self.monitor = health.start(p.distributed_timeout_minutes,  # names lost ranks if a collective fails
                                    dump_dir=restart.configure(cfg), attempt=restart.attempt())
        set_seed(cfg.training.seed)
        self.tokenizer = build_tokenizer(cfg.data)
        set_vocab_size(cfg, self.tokenizer.vocab_size)
        log.print_rank_0(format_config(cfg))
        self.model = build_model(cfg)
        self.train_iters = train_iterations(cfg)
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = build_lr_scheduler(cfg, self.optimizer, self.train_iters)
        self.scaler = build_loss_scaler(cfg)
        self.num_microbatches = num_microbatches(cfg)
        self.result = TrainResult()
        self.recent_losses = []  # --check-for-spiky-loss history (the last stage's losses)
        log.print_rank_0(memory_report(self.model, self.optimizer))
        c = cfg.checkpoint
        self.writer = CheckpointWriter(c.save, c.async_save, c.keep_last_n_checkpoints,
                                       c.save_retain_interval, defer_host_copies=True) if c.save else None
        if self.writer is not None and c.async_save:  # the writer thread copies CPU state after save()
            self.optimizer.before_update.append(self.writer.staging.wait_staged)
        self.reseed = False
        load_dir = restart.resume_dir(cfg)  # --load, else --save once it holds a checkpoint
        rng_state = self._load(load_dir) if load_dir else None
        self.start_iteration = self.result.iteration
        if restart.attempt() > 0:
            log.print_rank_0(restart.restart_message(restart.diagnostics_dir(cfg), restart.attempt(), load_dir,
                                                     self.result.iteration))
        self.faults = Faults(self.st.rank)
        self.stragglers = StragglerDetector(cfg, self.optimizer)
        self.tb = ScalarWriters(cfg, arguments=format_config(cfg, full=True))  # TensorBoard and W&B
        self.timeline = TimelineRecorder(cfg.logging.pipeline_timeline_dir, cfg.logging.pipeline_timeline_iters,
                                         meta={"num_microbatches": self.num_microbatches})
        self._build_data()
        if rng_state is not None:  # last: building the data iterators draws from torch's RNG
            set_rng_state(rng_state)
        elif self.reseed:
            set_seed(reseed_value(cfg.training.seed, self.result.iteration))

    def _load(self, load_dir: str):
        """Model (always), optimizer and schedule (unless --finetune / --no-load-optim), data position and
        RNG (unless --finetune / --no-load-rng) from a checkpoint of any layout (checkpoint/load.py)."""
        c, t = self.cfg.checkpoint, self.cfg.training
        finetune = c.finetune
        info = load_checkpoint(load_dir, self.model, optimizer=self.optimizer,
                               scheduler=None if finetune else self.scheduler,
                               scaler=None if finetune else self.scaler,
                               load_rng=not (finetune or c.no_load_rng),
                               load_optim=not (finetune or c.no_load_optim))
        saved = info["layout"]
        log.print_rank_0(f"loaded checkpoint from {load_dir} at iteration {info['iteration']} (saved at "
                         f"TP={saved['tp']} PP={saved['pp']} DP={saved['dp']}"
                         f"{', distributed optimizer' if saved['distributed_optimizer'] else ''})"
                         + (" (finetune: starting at iteration 0)" if finetune else ""))
        if not finetune:
            self.result.iteration, self.result.consumed_samples = info["iteration"], info["consumed_samples"]
            self.best_valid = info["extra"].get("best_valid_loss")
            self.bad_evals = info["extra"].get("evaluations_without_improvement", 0)
            saved_gbs = info["config"].get("training", {}).get("global_batch_size")
            if saved_gbs not in (None, t.global_batch_size):
                log.print_rank_0(f"WARNING: --global-batch-size {t.global_batch_size} differs from the checkpoint's "
                                 f"{saved_gbs}: training continues after sample {info['consumed_samples']} (none "
                                 "repeated or skipped), but iteration numbers no longer match samples as before")
            changes = schedule_changes(info["config"], self.cfg)
            if changes:
                log.print_rank_0(f"NOTE: {changes}")
        if info["rng_note"]:
            self.reseed = True
            log.print_rank_0(f"RNG state not restored ({info['rng_note']}); re-seeded with "
                             f"{reseed_value(t.seed, self.result.iteration)} from --seed and the iteration")
        return info["rng_state"]

    best_valid: float | None = None
    bad_evals: int = 0

    def _build_data(self):
        cfg, t = self.cfg, self.cfg.training
        gbs = t.global_batch_size
        samples = (self.train_iters * gbs, t.eval_iters * gbs if t.eval_interval else 0, t.eval_iters * gbs)
        train_ds, self.valid_ds, _ = build_train_valid_test_datasets(cfg, self.tokenizer, samples)
        self.train_iter = iter(build_data_loader(train_ds, cfg, self.result.consumed_samples))

    def _valid_iterator(self):
        """The same validation batches at every evaluation (unlike Megatron-LM, which walks on through
        the split): losses of successive evaluations are then comparable, which early stopping needs.
        A DataLoader iterator draws its seed from torch's RNG: fork it so evaluating does not shift
        the training run's dropout stream."""
        with torch.random.fork_rng(devices=[]):
            return iter(build_data_loader(self.valid_ds, self.cfg, 0))

    # ------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, t, r = self.cfg, self.cfg.training, self.result
        flops = flops_per_iteration(cfg)
        peak = device_peak_tflops(cfg, self.st.device)
        window = _fresh_window()
        saved_at = None
        while r.iteration < self.train_iters:
            start = time.perf_counter()
            self.stragglers.start_step(r.iteration + 1)
            self.faults.before_step(r.iteration + 1)
            with self.timeline.step(r.iteration + 1):
                step = train_step(cfg, self.model, self.optimizer, self.scaler, self.train_iter,
                                  self.num_microbatches)
            self.scheduler.step()
            self.stragglers.end_step()
            elapsed = time.perf_counter() - start
            r.iteration += 1
            if cfg.performance.compile and r.iteration == self.start_iteration + 1:
                log.print_rank_0(f"--compile: {compile_seconds():.1f} s of the first iteration ({elapsed:.1f} s) "
                                 "spent compiling the transformer blocks")
            r.consumed_samples += t.global_batch_size
            if self.writer is not None:
                self._published(self.writer.poll())  # an --async-save that finished meanwhile
            if self.monitor is not None:
                self.monitor.iteration(r.iteration)
            bad = step.loss is not None and not np.isfinite(step.loss)
            spike = self._is_spike(step.loss) if not (bad or step.skipped) else False
            verdict = _most_on_any_rank(NAN if bad and not step.skipped else SPIKE if spike else 0)
            if verdict:  # stop before anything of this step is saved: the last checkpoint stays the good one
                raise TrainingError(self._nan_message() if verdict == NAN else self._spike_message(step.loss))
            r.skipped_iterations += int(step.skipped)
            window["skipped"] += int(step.skipped)
            window["nan"] += int(bad)
            window["time"] += elapsed
            window["iters"] += 1
            if step.loss is not None and not bad:
                r.losses[r.iteration] = step.loss
                window["loss"] += step.loss
                window["n"] += 1
            if r.iteration % cfg.logging.log_interval == 0 or r.iteration == self.train_iters:
                self._log(window, step, flops, peak)
                window = _fresh_window()
                self.stragglers.report(r.iteration)
            saved_at = None
            stop = False
            if t.eval_interval and r.iteration % t.eval_interval == 0 and self.valid_ds is not None:
                stop = self._evaluate_and_check()
            c = cfg.checkpoint
            exiting = stop or (t.exit_interval and r.iteration % t.exit_interval == 0)
            if c.save and ((c.save_interval and r.iteration % c.save_interval == 0) or exiting):
                self._save()
                saved_at = r.iteration
            if exiting:
                r.stopped_early = bool(stop)
                log.print_rank_0(f"exiting at iteration {r.iteration}"
                                 + (" (early stopping)" if stop else " (--exit-interval)"))
                break
        if cfg.checkpoint.save and saved_at != r.iteration and r.iteration > self.start_iteration:
            self._save()
        if self.writer is not None:
            self._published(self.writer.wait())
        self.tb.close()
        self.timeline.save()
        self.optimizer.finish_param_sync()  # the last step's parameter all-gathers (ZeRO)
        return r

    def _log(self, w, step, flops, peak):
        t, it = self.cfg.training, self.result.iteration
        per_iter = w["time"] / max(w["iters"], 1)
        tflops = flops / per_iter / self.st.world_size / 1e12
        m = {"consumed_samples": self.result.consumed_samples, "iteration_time": per_iter, "tflops": tflops,
             "mfu": tflops / peak if peak else None,
             "tokens_per_second": t.global_batch_size * self.cfg.data.seq_length / per_iter,
             "lr": self.optimizer.param_groups[0]["lr"], "global_batch_size": t.global_batch_size,
             "lm_loss": w["loss"] / w["n"] if w["n"] else None, "loss_scale": step.loss_scale,
             "grad_norm": step.grad_norm, "skipped": w["skipped"], "nan": w["nan"]}
        m["moe"] = moe_stats = collect_moe_stats(self.model, self.cfg)  # a collective: every rank logs
        if moe_stats is not None:
            self.result.moe_stats[it] = moe_stats
        m["mtp"] = mtp_losses = collect_mtp_losses(self.model, self.cfg)  # a collective too
        if mtp_losses is not None:
            self.result.mtp_losses[it] = mtp_losses
        log.print_rank_last(log.iteration_line(it, self.train_iters, m))
        self.tb.scalars(it, {"learning-rate": m["lr"], "batch-size": t.global_batch_size,
                             "lm loss": m["lm_loss"], "loss-scale": step.loss_scale, "grad-norm": step.grad_norm,
                             "iteration-time": per_iter, "throughput": tflops,
                             "tokens-per-second": m["tokens_per_second"], **log.moe_scalars(moe_stats),
                             **{f"mtp_{k} loss": v for k, v in enumerate(mtp_losses or [], start=1)}})

    def _evaluate_and_check(self) -> bool:
        t, it = self.cfg.training, self.result.iteration
        loss = evaluate(self.cfg, self.model, self._valid_iterator(), t.eval_iters, self.num_microbatches)
        improved = False
        if loss is not None:
            self.result.valid_losses[it] = loss
            log.print_rank_last(log.validation_line(it, loss))
            self.tb.scalars(it, {"lm loss validation": loss, "lm loss validation ppl": log.perplexity(loss)})
            improved = self.best_valid is None or loss < self.best_valid
            if improved:
                self.best_valid = loss
        improved = _any_rank(improved)
        self.bad_evals = 0 if improved else self.bad_evals + 1
        patience = t.early_stopping_patience
        return bool(patience and self.bad_evals >= patience)

    def _save(self):
        r = self.result
        extra = {"best_valid_loss": self.best_valid, "evaluations_without_improvement": self.bad_evals}
        self._published(self.writer.wait())  # the previous --async-save, if its thread is still writing
        path = self.writer.save(r.iteration, self.model, self.optimizer, self.scheduler, self.scaler,
                                r.consumed_samples, self.cfg.to_json(), extra)
        stall = f"training stalled {self.writer.last_stall:.3f} s"  # what the save cost the loop, on rank 0
        if path is None:  # (the copies to host are issued, or made by the writer thread: staging.py)
            log.print_rank_0(f"saving checkpoint at iteration {r.iteration} in the background (--async-save): "
                             f"{stall}")
        else:
            log.print_rank_0(f"checkpoint of iteration {r.iteration} written synchronously ({stall})")
        self._published(path)

    def _published(self, path):
        if path is not None:
            self.result.last_checkpoint = path
            waited = self.writer.staging.waited  # by train_step, for the writer thread's copies (async)
            note = f" (training waited {waited:.3f} s for its copies to host)" if waited else ""
            log.print_rank_0(f"saved checkpoint to {path}{note}")

    def _is_spike(self, loss) -> bool:
        """--check-for-spiky-loss: a loss above --spiky-loss-factor × the largest of the last 100 losses
        (after 10 iterations of history). Losses that pass join the history."""
        if loss is None:
            return False
        t = self.cfg.training
        history = self.recent_losses
        spike = bool(t.check_for_spiky_loss and len(history) >= 10 and loss > t.spiky_loss_factor * max(history))
        if not spike:
            history.append(loss)
            del history[:-100]
        return spike

    def _spike_message(self, loss) -> str:
        last = self.result.last_checkpoint
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved"
        return (f"loss spike at iteration {self.result.iteration}: {loss:.4g} > --spiky-loss-factor "
                f"{self.cfg.training.spiky_loss_factor:g} × {max(self.recent_losses):.4g} (the largest of the last "
                f"{len(self.recent_losses)} losses); stopping without saving ({kept}). Resume from it with a "
                "lower --lr or more warmup, or skip the offending data.")

    def _nan_message(self) -> str:
        last = self.result.last_checkpoint
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved"
        return (f"loss is NaN or Inf at iteration {self.result.iteration}; stopping ({kept}). "
                "Try a lower --lr, --clip-grad, or --bf16 instead of --fp16.")


def pretrain(cfg: Config) -> TrainResult:
    """Train as configured; returns the loss history (on the logging rank) and the final position."""
    return _Trainer(cfg).run()
