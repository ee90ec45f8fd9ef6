"""Loss spikes and NaN: stop before saving, so the last checkpoint is the last good state; fp16 overflow
steps are skipped instead (test_training.py). The run below diverges deterministically: SGD with a
learning rate warming up to 20 gives losses ~5.5-8 for twelve steps, 87.6 at step 13 (over 10x the
largest before it), 1.2e5 at step 14, NaN at step 17."""
import pytest

from megaflow.config import ConfigError, parse_args
from megaflow.parallel import state
from megaflow.training.trainer import TrainingError, pretrain

DIVERGING = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "256", "--num-layers", "2",
             "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "4",
             "--global-batch-size", "8", "--num-workers", "0", "--log-interval", "100", "--eval-interval", "100",
             "--train-iters", "20", "--optimizer", "sgd", "--sgd-momentum", "0", "--lr", "20",
             "--lr-warmup-iters", "15", "--clip-grad", "0"]


def train(*extra):
    try:
        return pretrain(parse_args(DIVERGING + [str(a) for a in extra]))
    finally:
        state.destroy()


def test_a_spike_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingError, match=r"loss spike at iteration 13: .*iter_0000010") as e:
        train("--check-for-spiky-loss", "--save", tmp_path, "--save-interval", 5)
    assert "iter_0000010" in str(e.value)
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "10"
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000005", "iter_0000010"]


def test_without_the_check_the_same_run_only_stops_at_nan(tmp_path):
    with pytest.raises(TrainingError, match="NaN or Inf at iteration 17.*iter_0000015"):
        train("--save", tmp_path, "--save-interval", 5)
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "15"


def test_spiky_loss_factor_must_be_positive():
    with pytest.raises(ConfigError, match="--spiky-loss-factor"):
        parse_args(DIVERGING + ["--spiky-loss-factor", "0"])
