"""Run planning without running: parameters, model-state and activation bytes per rank, step time, and
a search over layouts. Pure arithmetic on a Config (nothing is allocated), so it is used both by
`pretrain_gpt.py --dry-run` and by `tools/estimate.py`.

    params.py       parameters per rank and chunk, in registration order
    memory.py       parameter, gradient and optimizer bytes, exactly as optim/ allocates them
    activations.py  bytes saved for backward per micro-batch and at a stage's peak in its schedule
    perf.py         step time from FLOPs, bandwidths and the schedule
    search.py       enumerate and rank layouts
    measure.py      the measurement the activation formulas are checked against
"""
from __future__ import annotations

from megaflow.config import Config, ConfigError


def tokenizer_vocab_size(cfg: Config) -> tuple[int, str]:
    """The tokenizer's vocabulary size and where it came from. Planning may happen where the tokenizer's
    files are not (a login node): then --vocab-size stands in for them."""
    from megaflow.data.tokenizers import build_tokenizer
    try:
        return build_tokenizer(cfg.data).vocab_size, "tokenizer"
    except Exception as e:  # missing files, packages, or flags: any of them means "not loadable here"
        if cfg.data.vocab_size:
            return cfg.data.vocab_size, "--vocab-size"
        raise ConfigError(f"cannot load the tokenizer here ({e}); pass --vocab-size N (the tokenizer's "
                          "vocabulary size) to plan without its files") from None
