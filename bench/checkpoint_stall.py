#!/usr/bin/env python
"""What a checkpoint save costs the training loop, synchronous against --async-save, in one run.

The same training (a Llama-style model, AdamW, mock tokens, one process) runs three times from the
same seed: without saves, with synchronous saves and with asynchronous saves (CheckpointWriter, the
trainer's writer), saving every --save-interval iterations, half an interval after the start so every
save is followed by a full interval of training. For each run it prints

    blocked   the time the save held the loop up: in save() (CheckpointWriter.last_stall, what the
              trainer's log line of a save iteration reports), the whole write when synchronous; when
              asynchronous, the index exchange in save() plus what the following steps waited, before
              their update, for the writer thread's copies to reused host buffers (staging.waited,
              reported when the save is published);
    cost      what a save costs the loop in wall time: the loop's time minus the no-save run's, per
              save. It adds to `blocked` the slowdown of the iterations that run while the writer
              thread competes for the CPU and the disk (on a GPU machine the writer uses host cores
              the GPU's training does not; on this CPU it takes them from training).

and the ratio async / sync of both (goal: the asynchronous stall, `blocked`, at most 10% of the
synchronous one).

    python bench/checkpoint_stall.py [--iterations 18] [--save-interval 6] [--dir /tmp/ckpt_stall]
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megaflow.checkpoint import CheckpointWriter  # noqa: E402
from megaflow.config import config_from_kwargs, set_vocab_size  # noqa: E402
from megaflow.model import build_model  # noqa: E402
from megaflow.optim.optimizer import build_optimizer  # noqa: E402
from megaflow.parallel import state  # noqa: E402
from megaflow.training.step import train_step  # noqa: E402

LAYERS, HIDDEN, HEADS, SEQ, MBS, VOCAB = 4, 512, 8, 64, 2, 16384


def run(mode, args, root):
    """Train args.iterations steps; mode is None (no saves), "sync" or "async". Returns the per-iteration
    times, the loop's wall time and the per-save blocked times."""
    cfg = config_from_kwargs(model_style="llama", num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                             seq_length=SEQ, micro_batch_size=MBS, hidden_dropout=0.0, attention_dropout=0.0,
                             lr=1e-4, seed=1234)
    set_vocab_size(cfg, VOCAB)
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    writer = CheckpointWriter(os.path.join(root, mode), async_save=mode == "async",
                              defer_host_copies=True) if mode else None   # as the trainer's writer
    if mode == "async":
        opt.before_update.append(writer.staging.wait_staged)            # as the trainer does
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=g) for _ in range(4)]
    iter_times, blocked = [], []
    loop_start = time.perf_counter()
    for it in range(1, args.iterations + 1):
        t = tokens[it % len(tokens)]
        batch = {"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(MBS, SEQ),
                 "position_ids": torch.arange(SEQ).expand(MBS, SEQ)}
        start = time.perf_counter()
        train_step(cfg, model, opt, None, iter([batch]), 1)
        if writer is not None:
            writer.poll()  # as the trainer does every iteration: finalize a finished async save
            if (it - args.save_interval // 2) % args.save_interval == 0:
                if blocked:  # what the steps since the last save waited for its deferred copies
                    blocked[-1] += writer.staging.waited
                writer.save(it, model, opt, None, None, it * MBS, cfg.to_json())
                blocked.append(writer.last_stall)
        iter_times.append(time.perf_counter() - start)
    loop = time.perf_counter() - loop_start
    if writer is not None:
        if blocked:
            blocked[-1] += writer.staging.waited
        writer.wait()  # the last write, after the loop (not charged)
    saved_bytes = writer.staging.nbytes() if writer is not None else 0
    return iter_times, loop, blocked, saved_bytes


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=18)
    ap.add_argument("--save-interval", type=int, default=6)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder, removed after)")
    args = ap.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="ckpt_stall_")
    state.initialize(1, 1, backend="gloo", device="cpu")
    try:
        results = {mode: run(mode, args, root) for mode in (None, "sync", "async")}
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    base_iter, base_loop = statistics.median(results[None][0]), results[None][1]
    print(f"model: {LAYERS} layers, hidden {HIDDEN}, vocab {VOCAB}, seq {SEQ}, micro-batch {MBS}, fp32, AdamW; "
          f"{torch.get_num_threads()} threads; {args.iterations} iterations, save every {args.save_interval}")
    print(f"no saves: median iteration {base_iter * 1e3:.0f} ms, loop {base_loop:.2f} s")
    costs = {}
    for mode in ("sync", "async"):
        iter_times, loop, blocked, nbytes = results[mode]
        median = statistics.median(iter_times)
        cost = (loop - base_loop) / len(blocked)   # against the same training without saves
        costs[mode] = (statistics.mean(blocked), cost)
        print(f"{mode:>5} saves: {len(blocked)} saves of {nbytes / 2**20:.0f} MiB | blocked "
              f"{statistics.mean(blocked) * 1e3:.0f} ms (per save: {' '.join(f'{b * 1e3:.0f}' for b in blocked)}) | "
              f"cost to the loop {cost * 1e3:.0f} ms per save | median iteration {median * 1e3:.0f} ms")
    (sb, sc), (ab, ac) = costs["sync"], costs["async"]
    print(f"async / sync: blocked {ab / sb:.3f} (goal <= 0.10) | cost to the loop {ac / sc:.3f}")
    state.destroy()


if __name__ == "__main__":
    main()
