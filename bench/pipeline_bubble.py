#!/usr/bin/env python
"""The pipeline schedules' own bubble: real processes and transfers, compute emulated by sleeping.

Each stage sleeps t_forward per micro-batch forward and t_backward per backward (split evenly over its
V chunks), so the measurement shows what the schedule and the transfers cost, not how many cores the
machine has (on 2 cores, 4 real stages would mostly measure CPU contention). Prints the measured bubble
beside the formula (p−1)/(v·m+p−1) for each V, and writes timelines tools/pipeline_timeline.py draws.

    torchrun --nproc-per-node 4 bench/pipeline_bubble.py --out runs/bubble --microbatches 8 --chunks 1 2
    python tools/pipeline_timeline.py runs/bubble/v2
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from megaflow.parallel import state  # noqa: E402
from megaflow.pipeline import schedules, timeline  # noqa: E402

SHAPE = (4, 2, 8)  # the tensor passed between stages: small, transfers stay cheap


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, t_forward, t_backward):
        ctx.t_backward = t_backward
        time.sleep(t_forward)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.t_backward)
        return grad.clone(), None, None


class SleepChunk(nn.Module):
    """A model chunk that takes a fixed time; the last stage's chunk returns a scalar 'loss'."""

    def __init__(self, pre_process, post_process, t_forward, t_backward):
        super().__init__()
        self.pre_process, self.post_process = pre_process, post_process
        self.w = nn.Parameter(torch.ones(()))
        self.t_forward, self.t_backward = t_forward, t_backward

    def forward(self, x):
        y = _Sleep.apply(x * self.w, self.t_forward, self.t_backward)
        return y.sum() if self.post_process else y


def sleep_step(model, batch, autocast_ctx, hidden_sbh=None):
    return model(batch if hidden_sbh is None else hidden_sbh)


def record_sleep_timeline(out_dir, pp, v, m, t_forward=0.02, t_backward=0.04, iterations=2, timeout=1.0):
    """Run `iterations` steps of the schedule for PP=pp (the world), V=v, M=m; write the timelines."""
    st = state.initialize(1, pp, backend="gloo", device="cpu", timeout_minutes=timeout, virtual_pp=v)
    chunks = [SleepChunk(st.is_first_stage and c == 0, st.is_last_stage and c == v - 1, t_forward / v,
                         t_backward / v) for c in range(v)]
    model = chunks[0] if v == 1 else nn.ModuleList(chunks)
    recorder = timeline.TimelineRecorder(out_dir, iterations, meta={"num_microbatches": m, "emulated": "sleep"})
    for it in range(iterations):
        with recorder.step(it + 1):
            schedules.get_forward_backward_func()(model, iter([torch.ones(SHAPE)] * m), m,
                                                  forward_step_func=sleep_step, tensor_shape=SHAPE)
    recorder.save()


def main():
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:  # plain python: one process cannot be a pipeline
        print("bench/pipeline_bubble.py needs torchrun, one process per pipeline stage: torchrun "
              "--nproc-per-node 4 bench/pipeline_bubble.py --out runs/bubble", file=sys.stderr)
        sys.exit(2)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--chunks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--forward-ms", type=float, default=20.0)
    ap.add_argument("--iterations", type=int, default=3)
    args = ap.parse_args()
    pp = int(os.environ.get("WORLD_SIZE", "1"))
    for v in args.chunks:
        out = os.path.join(args.out, f"v{v}")
        record_sleep_timeline(out, pp, v, args.microbatches, args.forward_ms / 1e3, 2 * args.forward_ms / 1e3,
                              args.iterations)
        torch.distributed.barrier()
        if state.get().rank == 0:
            rep = timeline.measure(timeline.load(out))
            print(f"PP={pp} V={v} M={args.microbatches}: measured bubble {rep['measured']:.3f} "
                  f"(per stage {' '.join(f'{b:.3f}' for b in rep['measured_per_stage'])}) | "
                  f"theory {rep['theory']:.3f} (measured / theory {rep['measured'] / rep['theory']:.2f}) | "
                  f"simulated with measured F/B times "
                  f"{rep['simulated_with_measured_times']:.3f}", flush=True)
    state.destroy()


if __name__ == "__main__":
    main()
