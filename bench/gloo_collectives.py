"""gloo's collectives against megaflow's (parallel/collectives.py), on the CPU processes of one host.

    reduce-scatter   torch.distributed.reduce_scatter_tensor  vs  megaflow: all_to_all_single + local sum
    all-gather       torch.distributed.all_gather_into_tensor (megaflow uses it)  vs  the all-to-all
                     composition (each rank's shard repeated N times), to show why it stays

For each size: wall time per call (slowest rank) and CPU time per rank per call (user + system, all
threads, time.process_time: on a shared CPU the cores the collective burns are cores the training does not get), median
of interleaved repetitions, and the ratio torch / megaflow. The ceiling beside them: copying the bytes
a rank receives ((N-1)/N of the input) once in memory, timed alone.

    python bench/gloo_collectives.py [--ranks 4] [--mib 3 16 64] [--reps 20]   (starts torchrun itself)
"""
import argparse
import statistics
import time

import torch
import torch.distributed as dist



def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--mib", type=float, nargs="+", default=[3, 16, 64], help="input sizes (fp32)")
    p.add_argument("--reps", type=int, default=20)
    return p.parse_args()


def timed(fn, reps):
    """Per call: (wall seconds of the slowest rank, CPU seconds of this rank), medians over reps."""
    walls, cpus = [], []
    for _ in range(reps):
        dist.barrier()
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        t = torch.tensor([time.perf_counter() - t0])
        cpus.append(time.process_time() - c0)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        walls.append(t.item())
    return statistics.median(walls), statistics.median(cpus)


def worker(a):
    from megaflow.parallel import collectives
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    n = dist.get_world_size()
    rows = []
    for mib in a.mib:
        numel = int(mib * 2**20 / 4) // n * n
        full, shard = torch.randn(numel), torch.randn(numel // n)
        out_shard, out_full = torch.empty(numel // n), torch.empty(numel)
        received = torch.empty(numel * (n - 1) // n)
        cases = {
            "rs torch": lambda: dist.reduce_scatter_tensor(out_shard, full),
            "rs megaflow": lambda: collectives.reduce_scatter(out_shard, full),
            "ag torch": lambda: dist.all_gather_into_tensor(out_full, shard),
            "ag all-to-all": lambda: dist.all_to_all_single(out_full, shard.repeat(n)),
            "copy": lambda: received.copy_(full[:received.numel()]),
        }
        for fn in cases.values():  # warm-up: connections, allocations
            fn()
        results = {k: [] for k in cases}
        for _ in range(2):  # interleaved rounds: load from other tenants hits every case alike
            for k, fn in cases.items():
                results[k].append(timed(fn, a.reps // 2))
        med = {k: tuple(statistics.median(x[i] for x in v) for i in range(2)) for k, v in results.items()}
        cpu = torch.tensor([med[k][1] for k in cases])
        dist.all_reduce(cpu)
        rows.append((mib, {k: (med[k][0], cpu[i].item() / n) for i, k in enumerate(cases)}))
    if dist.get_rank() == 0:
        print(f"gloo, {n} processes on one host, fp32; per call: wall ms (slowest rank) / CPU ms per rank")
        for mib, r in rows:
            ms = {k: (w * 1e3, c * 1e3) for k, (w, c) in r.items()}
            print(f"{mib:6.1f} MiB  reduce-scatter: torch {ms['rs torch'][0]:7.1f} / {ms['rs torch'][1]:6.1f}   "
                  f"megaflow {ms['rs megaflow'][0]:7.1f} / {ms['rs megaflow'][1]:6.1f}   "
                  f"torch/megaflow wall {r['rs torch'][0] / r['rs megaflow'][0]:.2f}x, CPU "
                  f"{r['rs torch'][1] / r['rs megaflow'][1]:.2f}x")
            print(f"{'':10} all-gather:     torch {ms['ag torch'][0]:7.1f} / {ms['ag torch'][1]:6.1f}   "
                  f"all-to-all {ms['ag all-to-all'][0]:7.1f} / {ms['ag all-to-all'][1]:6.1f}   "
                  f"(all-to-all/torch wall {r['ag all-to-all'][0] / r['ag torch'][0]:.2f}x)")
            print(f"{'':10} ceiling: copying the received bytes alone {ms['copy'][0]:.1f} ms; megaflow's "
                  f"reduce-scatter at {r['copy'][0] / r['rs megaflow'][0]:.2f} of it, torch's at "
                  f"{r['copy'][0] / r['rs torch'][0]:.2f}")
    dist.destroy_process_group()


def main():
    from launch import worker_or_torchrun
    a = parse()
    worker_or_torchrun(__file__, a.ranks, worker, a)


if __name__ == "__main__":
    main()
