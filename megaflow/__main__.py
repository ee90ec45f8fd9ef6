"""`python -m megaflow [flags]` and `torchrun ... -m megaflow [flags]`: GPT pretraining."""
import sys


def main(argv=None) -> int:
    from megaflow.config import ConfigError, parse_args
    from megaflow.parallel import state
    try:
        cfg = parse_args(argv)  # fails on bad flags before any process group exists
    except ConfigError as e:
        print(f"megaflow: configuration error: {e}", file=sys.stderr)
        return 2
    from megaflow.training.trainer import TrainingError, pretrain
    try:
        pretrain(cfg)
    except TrainingError as e:
        print(f"megaflow: training stopped: {e}", file=sys.stderr)
        return 1
    finally:
        state.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
