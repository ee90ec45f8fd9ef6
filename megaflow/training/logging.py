"""Console lines in Megatron-LM's shape and the same scalars in TensorBoard."""
from __future__ import annotations

import datetime
import math
import sys

from megaflow.parallel import state


def is_logging_rank() -> bool:
    """The last rank holds the loss (last pipeline stage), as Megatron's print_rank_last."""
    st = state.get()
    return st.rank == st.world_size - 1


def print_rank_0(msg: str) -> None:
    if state.get().rank == 0:
        print(msg, flush=True)


def print_rank_last(msg: str) -> None:
    if is_logging_rank():
        print(msg, flush=True)


def iteration_line(it: int, train_iters: int, m: dict) -> str:
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    parts = [f" [{now}] iteration {it:8d}/{train_iters:8d}",
             f" consumed samples: {m['consumed_samples']:12d}",
             f" elapsed time per iteration (ms): {m['iteration_time'] * 1000:.1f}"]
    if m.get("tflops") is not None:
        tflops = m["tflops"]  # CPU runs see fractions of a TFLOP/s: keep 3 significant digits there
        parts.append(f" throughput per GPU (TFLOP/s/GPU): {tflops:.1f}" if tflops >= 10 else
                     f" throughput per GPU (TFLOP/s/GPU): {tflops:.3g}")
    if m.get("mfu") is not None:
        parts.append(f" MFU: {m['mfu'] * 100:.1f}%")
    parts += [f" tokens per second: {m['tokens_per_second']:.1f}",
              f" learning rate: {m['lr']:.6E}",
              f" global batch size: {m['global_batch_size']:5d}"]
    if m.get("lm_loss") is not None:
        parts.append(f" lm loss: {m['lm_loss']:.6E}")
    parts += [f" mtp_{k} loss: {v:.6E}" for k, v in enumerate(m.get("mtp") or [], start=1)]
    parts += [f" loss scale: {m['loss_scale']:.1f}"]
    if m.get("grad_norm") is not None:
        parts.append(f" grad norm: {m['grad_norm']:.3f}")
    parts += moe_line_parts(m.get("moe"))
    parts += [f" number of skipped iterations: {m['skipped']:3d}",
              f" number of nan iterations: {m['nan']:3d}"]
    return " |".join(parts) + " |"


def moe_line_parts(stats) -> list:
    """MoE figures of the log line (layers/moe/stats.py): losses summed over the MoE layers, the worst
    layer's load imbalance (max/mean tokens per expert), each layer's tokens per expert."""
    if not stats:
        return []
    parts = [f" moe aux loss: {stats['aux_loss']:.4E}", f" moe z loss: {stats['z_loss']:.4E}",
             f" moe load imbalance: {stats['load_imbalance']:.3f}"]
    if stats.get("dropped_fraction") is not None:
        parts.append(f" moe dropped fraction: {stats['dropped_fraction']:.4f}")
    per_layer = " ".join(f"L{i}:[{','.join(str(int(c)) for c in v['tokens_per_expert'])}]"
                         for i, v in stats["layers"].items())
    parts.append(f" moe tokens per expert: {per_layer}")
    return parts


def moe_scalars(stats) -> dict:
    """The same figures for TensorBoard, per layer."""
    if not stats:
        return {}
    out = {"moe/aux-loss": stats["aux_loss"], "moe/z-loss": stats["z_loss"],
           "moe/load-imbalance": stats["load_imbalance"], "moe/dropped-fraction": stats.get("dropped_fraction")}
    for i, v in stats["layers"].items():
        out[f"moe/layer-{i}/aux-loss"] = v["aux_loss"]
        out[f"moe/layer-{i}/z-loss"] = v["z_loss"]
        out[f"moe/layer-{i}/load-imbalance"] = v["load_imbalance"]
        out[f"moe/layer-{i}/dropped-fraction"] = v["dropped_fraction"]
        for e, c in enumerate(v["tokens_per_expert"]):
            out[f"moe/layer-{i}/tokens-per-expert/{e}"] = c
    return out


def perplexity(loss: float) -> float:
    return math.exp(min(20.0, loss))


def validation_line(it: int, loss: float, label: str = "validation") -> str:
    body = f" {label} loss at iteration {it} | lm loss value: {loss:.6E} | lm loss PPL: {perplexity(loss):.6E} | "
    bar = "-" * len(body)
    return f"{bar}\n{body}\n{bar}"


class TensorBoardLogger:
    """SummaryWriter on the logging rank only; a no-op elsewhere or without --tensorboard-dir. The writer
    (and its event file) is created at the first scalar, so a run that fails before logging anything
    leaves no empty event files. `arguments` (the full configuration) is written then as text, as
    Megatron-LM records its arguments."""

    def __init__(self, log_dir: str | None, arguments: str | None = None):
        self.writer = None
        self.log_dir = log_dir if log_dir and is_logging_rank() else None
        self.arguments = arguments

    def _open(self):
        if self.writer is None and self.log_dir:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=self.log_dir, max_queue=1000)
            if self.arguments:  # indented: TensorBoard renders text as Markdown
                self.writer.add_text("arguments", "\n".join("    " + line for line in self.arguments.splitlines()))
        return self.writer

    def scalars(self, it: int, values: dict) -> None:
        if self._open() is None:
            return
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(name, value, it)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def warn(msg: str) -> None:
    print(f"WARNING: {msg}", file=sys.stderr, flush=True)
