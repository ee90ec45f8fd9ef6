"""Loss spikes and NaN: stop before saving, so the last checkpoint is the last good state; fp16 overflow
steps are skipped instead (test_training.py). The run below diverges deterministically: SGD with a
learning rate warming up to 30 spikes at step 11 (over 10x the largest loss before it). Past the spike
the run is chaotic (where it turns NaN depends on the thread count's summation order), so the NaN test
warms up to 300 instead, which overflows to NaN at step 7 whatever the threads."""
import pytest

from megaflow.config import ConfigError, parse_args
from megaflow.parallel import state
from megaflow.training.trainer import TrainingError, pretrain

DIVERGING = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "256", "--num-layers", "2",
             "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "4",
             "--global-batch-size", "8", "--num-workers", "0", "--log-interval", "100", "--eval-interval", "100",
             "--train-iters", "20", "--optimizer", "sgd", "--sgd-momentum", "0", "--lr", "30",
             "--lr-warmup-iters", "15", "--clip-grad", "0"]


def train(*extra):
    try:
        return pretrain(parse_args(DIVERGING + [str(a) for a in extra]))
    finally:
        state.destroy()


def test_a_spike_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingError, match=r"loss spike at iteration 11: .*iter_0000010") as e:
        train("--check-for-spiky-loss", "--save", tmp_path, "--save-interval", 5)
    assert "iter_0000010" in str(e.value)
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "10"
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000005", "iter_0000010"]


def test_without_the_check_the_same_run_only_stops_at_nan(tmp_path):
    with pytest.raises(TrainingError, match="NaN or Inf at iteration 7.*iter_0000005"):
        train("--save", tmp_path, "--save-interval", 5, "--lr", 300)
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "5"


def test_spiky_loss_factor_must_be_positive():
    with pytest.raises(ConfigError, match="--spiky-loss-factor"):
        parse_args(DIVERGING + ["--spiky-loss-factor", "0"])
