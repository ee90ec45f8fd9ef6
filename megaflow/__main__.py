"""`python -m megaflow [flags]` and `torchrun ... -m megaflow [flags]`: GPT pretraining."""
import os
import sys


def main(argv=None) -> int:
    from megaflow.config import ConfigError, parse_args
    from megaflow.parallel import state
    try:
        cfg = parse_args(argv)  # fails on bad flags before any process group exists
    except ConfigError as e:
        print(f"megaflow: configuration error: {e}", file=sys.stderr)
        return 2
    if cfg.training.dry_run:
        return _dry_run(cfg)
    from megaflow.training.trainer import TrainingError, pretrain
    try:
        pretrain(cfg)
    except TrainingError as e:
        print(f"megaflow: training stopped: {e}", file=sys.stderr)
        return 1
    finally:
        state.destroy()
    return 0


def _dry_run(cfg) -> int:
    from megaflow.config import ConfigError
    from megaflow.training.dry_run import dry_run
    try:
        report = dry_run(cfg)
    except ConfigError as e:
        print(f"megaflow: configuration error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank checks, rank 0 prints
        print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
