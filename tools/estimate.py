"""Plan a run: for a model (megaflow's flags) and a cluster, enumerate TP / CP / PP / virtual PP / DP / ZeRO /
recompute / micro-batch layouts, predict per-GPU memory and step time, and rank the layouts that fit.

    python tools/estimate.py --gpus 64 --gpu-memory-gib 80 \\
        --model-style llama --num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336 \\
        --num-attention-heads 32 --group-query-attention --num-query-groups 8 --seq-length 8192 \\
        --vocab-size 128256 --global-batch-size 512 --bf16 --attention-dropout 0 --hidden-dropout 0

Every flag that is not a cluster flag below is a pretrain_gpt.py flag. Parallel or recompute flags given
there (--tensor-model-parallel-size 8, --recompute-granularity selective, ...) are kept fixed; the rest
are searched. Memory is exact for parameters, gradients and optimizer state (it mirrors optim/'s
buffers); activations follow the kernels megaflow runs (--kernels cuda: the Triton kernels GPUs use;
cpu: the torch paths, checked against measurements on CPU). Step time is a model: FLOPs at
--efficiency × --peak-tflops, ring collectives at the given bandwidths, the pipeline bubble.
See docs/planning.md for the formulas and their validation.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaflow.config import ConfigError, build_parser, parse_args, set_vocab_size  # noqa: E402
from megaflow.planner import tokenizer_vocab_size  # noqa: E402
from megaflow.planner.perf import Cluster  # noqa: E402
from megaflow.planner.search import GIB, SEARCHED, search  # noqa: E402


def cluster_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/estimate.py", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    c = p.add_argument_group("cluster")
    c.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    c.add_argument("--gpus-per-node", type=int, default=8)
    c.add_argument("--gpu-memory-gib", type=float, default=80.0)
    c.add_argument("--intra-node-bandwidth", type=float, default=450.0, help="GB/s per GPU, each way (NVLink)")
    c.add_argument("--inter-node-bandwidth", type=float, default=50.0, help="GB/s per GPU, each way (NICs)")
    c.add_argument("--peak-tflops", type=float, default=989.0, help="dense peak of the training dtype")
    c.add_argument("--efficiency", type=float, default=0.55, help="fraction of peak large GEMMs reach")
    c.add_argument("--hbm-bandwidth", type=float, default=3350.0, help="GB/s of device memory")
    c.add_argument("--latency-us", type=float, default=20.0, help="fixed cost per collective")
    c.add_argument("--kernel-overhead-us", type=float, default=5.0, help="fixed cost per kernel launch")
    c.add_argument("--reserved-gib", type=float, default=4.0, help="memory kept free (context, fragmentation)")
    o = p.add_argument_group("output")
    o.add_argument("--kernels", choices=["cuda", "cpu"], default="cuda", help="activation model to use")
    o.add_argument("--top", type=int, default=10, help="layouts to print")
    o.add_argument("--all", action="store_true", help="also print layouts that do not fit")
    o.add_argument("--json", help="write every evaluated layout here")
    return p


def row(plan, rank) -> str:
    c, m, t = plan.cfg, plan.memory, plan.time
    p = c.parallel
    zero = f"Z{getattr(p, 'zero_stage', 2)}" if p.use_distributed_optimizer else "-"
    return (f"{rank:>3} {p.tensor_model_parallel_size:>2} {'y' if p.sequence_parallel else '-':>2} "
            f"{p.context_parallel_size:>2} "
            f"{p.pipeline_model_parallel_size:>2} {p.num_layers_per_virtual_pipeline_stage or '-':>3} "
            f"{c.data_parallel_size:>4} {zero:>4} {c.model.recompute_granularity or '-':>9} "
            f"{c.training.micro_batch_size:>3} | {m['parameters'] / GIB:6.1f} {m['gradients'] / GIB:6.1f} "
            f"{m['optimizer'] / GIB:6.1f} {m['activations'] / GIB:6.1f} {m['total'] / GIB:6.1f} | "
            f"{t['step']:8.3f} {plan.tokens_per_second / c.world_size:9.0f} {100 * plan.mfu:5.1f} "
            f"{t['bubble_fraction']:5.2f}{'' if plan.fits else '  does not fit'}")


HEADER = ("  #  TP SP CP PP VPP   DP ZeRO recompute MBS |  param   grad    opt    act  total | "
          " step(s) tok/s/GPU  MFU% bubble\n" + "-" * 124)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print(cluster_parser().format_help())
        print("model and training: every pretrain_gpt.py flag, below\n")
        print(build_parser().format_help())
        return 0
    args, rest = cluster_parser().parse_known_args(argv)
    cluster = Cluster(gpus=args.gpus, gpus_per_node=args.gpus_per_node, memory_gib=args.gpu_memory_gib,
                      intra_node_gbps=args.intra_node_bandwidth, inter_node_gbps=args.inter_node_bandwidth,
                      peak_tflops=args.peak_tflops, efficiency=args.efficiency, hbm_gbps=args.hbm_bandwidth,
                      latency_us=args.latency_us, kernel_overhead_us=args.kernel_overhead_us,
                      reserved_gib=args.reserved_gib)
    try:
        base = parse_args(rest, world_size=args.gpus, check=False)
        if base.training.global_batch_size is None:
            raise ConfigError("--global-batch-size is needed to plan (it fixes the micro-batches per step)")
        vocab, _source = tokenizer_vocab_size(base)
    except ConfigError as e:
        print(f"estimate: {e}", file=sys.stderr)
        return 2
    set_vocab_size(base, vocab)
    given = {flag.split("=")[0] for flag in rest if flag.startswith("--")}
    fixed = {SEARCHED[f] for f in given if f in SEARCHED}
    plans = search(base, cluster, fixed, device=args.kernels)
    if not plans:
        print("estimate: no valid layout (check that the GPU count, layers, heads and batch sizes divide)",
              file=sys.stderr)
        return 1
    fitting = [p for p in plans if p.fits]
    print(f"{len(plans)} layouts evaluated for {cluster.gpus} GPUs ({cluster.gpus_per_node} per node, "
          f"{cluster.memory_gib:g} GiB each); {len(fitting)} fit in {cluster.memory_gib - cluster.reserved_gib:g} GiB. "
          "Memory in GiB on the rank that needs most; step time and throughput predicted.")
    print(HEADER)
    shown = plans if args.all else fitting
    for i, plan in enumerate(shown[:args.top], 1):
        print(row(plan, i))
    if fitting:
        best = fitting[0]
        print(f"\nbest: {best.flags()}")
        print(f"      predicted step {best.time['step']:.3f} s (compute {best.time['compute']:.3f}, TP comm "
              f"{best.time['tp_comm']:.3f}, CP comm {best.time['cp_comm']:.3f}, EP comm {best.time['ep_comm']:.3f}, "
              f"bubble {best.time['bubble_fraction']:.1%}, P2P {best.time['p2p']:.3f}, "
              f"DP exposed {best.time['dp_grad'] + best.time['dp_param']:.3f}, optimizer "
              f"{best.time['optimizer']:.3f}); stage {best.memory['pp_rank']} holds "
              f"{best.memory['in_flight']} micro-batch(es) at its peak")
    else:
        print("\nnothing fits: more GPUs, recompute, a smaller micro-batch, or ZeRO (see --all)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([{"flags": p.flags(), "world_size": p.cfg.world_size, "fits": p.fits, "memory": p.memory,
                        "time": p.time, "tokens_per_second": p.tokens_per_second, "mfu": p.mfu} for p in plans],
                      fh, indent=1)
    return 0 if fitting else 1


if __name__ == "__main__":
    sys.exit(main())
