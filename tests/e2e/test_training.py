"""End-to-end training in one process on mock data: loss drops, exact resume, stops and logs."""
import math
import os
import time

import pytest

from megaflow.config import ConfigError, parse_args
from megaflow.parallel import state
from megaflow.training.trainer import TrainingError, pretrain

TINY = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "256", "--num-layers", "2",
        "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "4",
        "--global-batch-size", "8", "--num-workers", "0", "--log-interval", "1", "--eval-iters", "2"]


def train(*extra):
    try:
        return pretrain(parse_args(TINY + [str(a) for a in extra]))
    finally:
        state.destroy()


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_loss_drops(style):
    r = train("--model-style", style, "--train-iters", 30, "--lr", "3e-3", "--lr-warmup-iters", 3,
              "--eval-interval", 15)
    first, last = sum(r.losses[i] for i in (1, 2, 3)) / 3, sum(r.losses[i] for i in (28, 29, 30)) / 3
    assert last < first - 0.3, (first, last)
    assert set(r.valid_losses) == {15, 30}


def test_resume_is_bitwise_identical(tmp_path):
    common = ["--model-style", "llama", "--train-iters", 8, "--lr", "1e-3", "--lr-decay-style", "cosine",
              "--lr-warmup-iters", 2, "--hidden-dropout", "0.1", "--attention-dropout", "0.1",
              "--eval-interval", 3]
    full = train(*common)
    first = train(*common, "--save", tmp_path, "--save-interval", 100, "--exit-interval", 4)
    assert first.iteration == 4 and (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "4"
    resumed = train(*common, "--load", tmp_path)
    assert resumed.iteration == 8
    for it in range(5, 9):
        assert resumed.losses[it] == full.losses[it], it   # bitwise, not approximately
    assert resumed.valid_losses[6] == full.valid_losses[6]


def test_nan_loss_stops_with_a_clear_message():
    with pytest.raises(TrainingError, match="NaN or Inf at iteration"):
        train("--train-iters", 5, "--lr", "1e30", "--clip-grad", "0", "--optimizer", "sgd",
              "--eval-interval", 100)


def test_early_stopping_after_patience():
    # lr 0: the validation loss never improves after the first evaluation.
    r = train("--train-iters", 20, "--lr", "0", "--eval-interval", 2, "--early-stopping-patience", 2)
    assert r.stopped_early and r.iteration == 6


def test_fp16_dynamic_scaler_skips_overflow_steps():
    r = train("--train-iters", 4, "--fp16", "--initial-loss-scale", str(2.0 ** 40), "--hysteresis", 1,
              "--eval-interval", 100)
    assert r.skipped_iterations >= 1          # 2^40 overflows fp16, halved each step
    assert all(math.isfinite(v) for v in r.losses.values())


def test_bf16_trains(tmp_path):
    r = train("--train-iters", 3, "--bf16", "--eval-interval", 100, "--tensorboard-dir", tmp_path)
    assert len(r.losses) == 3 and all(math.isfinite(v) for v in r.losses.values())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"lm loss", "learning-rate", "grad-norm", "loss-scale", "throughput"} <= tags
    assert [e.step for e in acc.Scalars("lm loss")] == [1, 2, 3]


def test_finetune_no_load_optim_no_load_rng(tmp_path):
    common = ["--model-style", "llama", "--train-iters", 6, "--lr", "3e-3", "--hidden-dropout", "0.1",
              "--attention-dropout", "0.1", "--eval-interval", 100]
    full = train(*common)
    train(*common, "--save", tmp_path, "--save-interval", 100, "--exit-interval", 3)
    # --no-load-rng: the step after the checkpoint draws other dropout masks (streams restart from --seed).
    no_rng = train(*common, "--load", tmp_path, "--no-load-rng")
    assert no_rng.iteration == 6 and sorted(no_rng.losses) == [4, 5, 6] and no_rng.losses[4] != full.losses[4]
    # --no-load-optim: same weights, data and masks, so the first loss is the uninterrupted run's, bit for
    # bit; fresh Adam moments (and, as in Megatron, a fresh LR schedule) change the steps after it.
    no_optim = train(*common, "--load", tmp_path, "--no-load-optim")
    assert no_optim.losses[4] == full.losses[4] and no_optim.losses[5] != full.losses[5]
    # --finetune: the weights only; iteration and data position start at 0.
    fresh = train(*common[:2], "--train-iters", 2, *common[4:])
    tuned = train(*common[:2], "--train-iters", 2, *common[4:], "--load", tmp_path, "--finetune")
    assert tuned.iteration == 2 and tuned.consumed_samples == 16
    assert tuned.losses[1] < fresh.losses[1] - 0.2, (tuned.losses, fresh.losses)  # trained weights


def test_async_saves_with_retention_from_the_command_line(tmp_path, capsys, monkeypatch):
    from megaflow.checkpoint import format as fmt
    write = fmt.write_rank_file                     # slow writes: some saves are still in flight at the next
    monkeypatch.setattr(fmt, "write_rank_file", lambda *a: time.sleep(0.3) or write(*a))   # save, some not
    r = train("--train-iters", 5, "--eval-interval", 100, "--save", tmp_path, "--save-interval", 1,
              "--async-save", "--keep-last-n-checkpoints", 2, "--save-retain-interval", 2)
    assert r.last_checkpoint == str(tmp_path / "iter_0000005")
    assert sorted(os.listdir(tmp_path)) == ["iter_0000002", "iter_0000004", "iter_0000005",
                                            "latest_checkpointed_iteration.txt"]
    out = capsys.readouterr().out
    assert out.count("in the background (--async-save)") == 5 and out.count("saved checkpoint to") == 5
    with pytest.raises(ConfigError, match=r"--save-retain-interval \(3\) must be a multiple of --save-interval \(2\)"):
        parse_args(TINY + ["--save-interval", "2", "--save-retain-interval", "3"])
