"""Context parallelism on CPU: peak activation memory per rank and step time of one training
micro-batch (forward + backward) at sequence lengths 4k-32k, for CP = 1, 2, 4 and each --cp-comm-type
(p2p ring, a2a, all_gather), in one run. The peers are megaflow's own CP = 1 run (PyTorch's
context_parallel has no CPU flash-attention sharding, Megatron's CP needs Transformer Engine).

    memory      bytes autograd keeps for backward on a rank (planner/measure.py's ActivationMeter),
                next to the planner's prediction (planner/activations.py)
    time        wall time of the step on the slowest rank, and CPU seconds summed over the CP ranks
                per token: the work CP adds (communication, the ring's extra bookkeeping, merging
                partial results) shows in the latter, since the ranks split the same FLOPs

One torchrun launch per CP size (1, 2 and 4 gloo processes, OMP_NUM_THREADS=1 each), every sequence
length and comm type inside it; a small Llama (2 layers, hidden 64, 4 heads, GQA 2), fp32, torch
kernels (PyTorch's CPU flash attention, which returns the log-sum-exp the ring merges with).

    python bench/context_parallel.py [--seqs 4096 8192 16384 32768] [--steps 2]
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
COMMS = ("p2p", "a2a", "all_gather")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    p.add_argument("--cps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--steps", type=int, default=2, help="timed steps per configuration (after one warm-up)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--json", help="write the results here too")
    p.add_argument("--worker", help=argparse.SUPPRESS)   # internal: results file of a torchrun worker
    return p.parse_args(argv)


def _cfg(args, seq, cp, comm):
    from megaflow.config import config_from_kwargs, set_vocab_size
    cfg = config_from_kwargs(world_size=cp, model_style="llama", num_layers=args.layers, hidden_size=args.hidden,
                             num_attention_heads=args.heads, group_query_attention=True, num_query_groups=2,
                             seq_length=seq, vocab_size=args.vocab, hidden_dropout=0.0, attention_dropout=0.0,
                             micro_batch_size=1, global_batch_size=1, context_parallel_size=cp,
                             cp_comm_type=comm, attention_backend="torch", norm_backend="torch", seed=1)
    set_vocab_size(cfg, args.vocab)
    return cfg


def worker(args):
    """One CP size (this torchrun launch): every sequence length and comm type."""
    import torch
    import torch.distributed as dist

    from megaflow.model import build_model
    from megaflow.parallel import state
    from megaflow.pipeline.schedules import forward_backward_no_pipelining
    from megaflow.planner.activations import stage_activation_bytes
    from megaflow.planner.measure import measure_step
    from megaflow.training.step import _forward_step, _split_for_context_parallel

    cp = int(os.environ.get("WORLD_SIZE", "1"))
    st = state.initialize(cp=cp, backend="gloo", device="cpu")
    results = []
    for seq in args.seqs:
        for comm in (COMMS if cp > 1 else ("-",)):
            cfg = _cfg(args, seq, cp, comm if cp > 1 else "p2p")
            torch.manual_seed(0)
            model = build_model(cfg)
            g = torch.Generator().manual_seed(seq)
            batch = {"tokens": torch.randint(0, args.vocab, (1, seq), generator=g),
                     "labels": torch.randint(0, args.vocab, (1, seq), generator=g),
                     "loss_mask": torch.ones(1, seq), "position_ids": torch.arange(seq)[None]}
            mine = _split_for_context_parallel(batch, st.cp_rank, cp)
            step = dict(forward_step_func=_forward_step) if cp > 1 else {}
            data = mine if cp > 1 else batch
            peak = measure_step(model, [data], forward_backward_no_pipelining, 1, **step)["peak"]
            walls, cpus = [], []
            for i in range(args.steps + 1):                   # the first step warms up
                model.zero_grad(set_to_none=True)
                if dist.is_initialized():
                    dist.barrier()
                w0, c0 = time.perf_counter(), time.process_time()
                forward_backward_no_pipelining(model, iter([data]), 1, **step)
                wall, cpu = time.perf_counter() - w0, time.process_time() - c0
                if i:
                    walls.append(wall)
                    cpus.append(cpu)
            row = torch.tensor([min(walls), min(cpus)])
            if dist.is_initialized():  # slowest rank's wall time; CPU seconds summed over ranks
                wall = row[:1].clone()
                dist.all_reduce(wall, op=dist.ReduceOp.MAX)
                dist.all_reduce(row)
                row[0] = wall[0]
            results.append({"seq": seq, "cp": cp, "comm": comm, "activation_bytes": peak,
                            "predicted_bytes": stage_activation_bytes(cfg, 0, "cpu")["peak"],
                            "wall_s": row[0].item(), "cpu_s_summed": row[1].item()})
    if st.rank == 0:
        with open(args.worker, "w") as fh:
            json.dump(results, fh)
    state.destroy()


def launch(args, cp, out):
    forwarded = ["--seqs", *map(str, args.seqs), "--steps", str(args.steps), "--layers", str(args.layers),
                 "--hidden", str(args.hidden), "--heads", str(args.heads), "--vocab", str(args.vocab)]
    with socket.socket() as sock:  # a free port for this launch's rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={cp}", "--master-addr=127.0.0.1",
           f"--master-port={port}", os.path.abspath(__file__), *forwarded, "--worker", out]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    with open(out) as fh:
        return json.load(fh)


def report(rows) -> list[str]:
    base = {r["seq"]: r for r in rows if r["cp"] == 1}
    lines = [f"{'seq':>6} {'CP':>3} {'comm':>10} | {'act MiB/rank':>12} {'planned':>8} {'x CP=1':>7} | "
             f"{'step s':>7} {'CPU us/token':>12} {'x CP=1':>7}", "-" * 86]
    for r in sorted(rows, key=lambda r: (r["seq"], r["cp"], r["comm"])):
        b = base.get(r["seq"])
        mem_ratio = r["activation_bytes"] / b["activation_bytes"] if b else float("nan")
        cpu_ratio = r["cpu_s_summed"] / b["cpu_s_summed"] if b else float("nan")
        lines.append(f"{r['seq']:>6} {r['cp']:>3} {r['comm']:>10} | {r['activation_bytes'] / 2**20:12.1f} "
                     f"{r['predicted_bytes'] / 2**20:8.1f} {mem_ratio:7.3f} | {r['wall_s']:7.2f} "
                     f"{1e6 * r['cpu_s_summed'] / r['seq']:12.1f} {cpu_ratio:7.2f}")
    return lines


def main(argv=None):
    args = parse(argv)
    if args.worker:
        return worker(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cp in args.cps:
            rows += launch(args, cp, os.path.join(tmp, f"cp{cp}.json"))
    print("\n".join(report(rows)))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
