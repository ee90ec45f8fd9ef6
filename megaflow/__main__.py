"""`python -m megaflow [flags]` and `torchrun ... -m megaflow [flags]`: GPT pretraining."""
import os
import sys


def main(argv=None) -> int:
    from megaflow.config import parse_args
    from megaflow.errors import UserError, debug_requested, report
    from megaflow.parallel import state
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = debug_requested(argv)
    try:
        cfg = parse_args(argv)  # fails on bad flags before any process group exists
        if cfg.training.dry_run:
            return _dry_run(cfg)
        from megaflow.training.preflight import check
        check(cfg)  # data, tokenizer and --load files: before the argument dump and before any model
    except UserError as e:  # every rank fails alike: rank 0 prints, the others leave with its status
        return report(e, debug=debug)
    from megaflow.training.trainer import TrainingError, pretrain
    try:
        pretrain(cfg)
    except TrainingError as e:  # every rank agreed to stop (NaN loss, ...): leave together
        print(f"megaflow: training stopped: {e}", file=sys.stderr)
        state.destroy()
        return 1
    except Exception as e:
        if state.get().world_size == 1:
            if isinstance(e, UserError) and not debug:  # a file found broken only when read
                state.destroy()
                return report(e)
            raise
        _distributed_failure(e, quiet=isinstance(e, UserError) and not debug)  # does not return
    state.destroy()
    return 0


def _distributed_failure(error: BaseException, quiet: bool = False) -> None:
    """A rank failed or a collective broke: say which ranks are gone (first), leave a failure record for
    an automatic restart (training/restart.py), then exit at once (tearing down a process group whose
    peers are dead can block, so no barrier and no destructors). A rank whose own code failed (not a
    collective) exits without waiting: its peers, blocked in their next collective, notice at once.
    quiet: a UserError found only once running (its message is the diagnosis), without a traceback."""
    import traceback
    from megaflow.parallel import health, state
    from megaflow.training import restart
    monitor = health.get()
    collective = _is_collective_failure(error)
    if monitor is not None and collective:
        what = monitor.diagnose(error)
    else:
        if monitor is not None:
            monitor.record_exit(error)
        what = f"rank {state.get().rank} failed: {type(error).__name__}: {error}"
    print(f"megaflow: {what}", file=sys.stderr, flush=True)
    if not quiet:
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    restart.write_failure_record(state.get().rank, monitor.last_iteration + 1 if monitor else None, error,
                                 what if collective else "")
    if monitor is not None and collective:
        monitor.linger()
    os._exit(1)


def _is_collective_failure(error: BaseException) -> bool:
    """Did a collective or a peer connection fail (rather than this rank's own code)?"""
    import torch.distributed as dist
    from megaflow.parallel import flight_recorder
    if flight_recorder.get().in_flight is not None or isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = f"{type(error).__name__} {error}".lower()
    return any(w in text for w in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket",
                                   "store", "closed"))


def _dry_run(cfg) -> int:
    from megaflow.training.dry_run import dry_run
    report = dry_run(cfg)  # a ConfigError goes to main's handler
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank checks, rank 0 prints
        print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
