"""The entry points as a user runs them: pretrain_gpt.py and python -m megaflow."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--num-layers", "1",
        "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "16", "--micro-batch-size", "2",
        "--num-workers", "0", "--log-interval", "1", "--eval-interval", "2", "--eval-iters", "1"]


def run(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)


def test_pretrain_gpt_prints_megatron_lines():
    proc = run("pretrain_gpt.py", *TINY, "--train-iters", "2")
    assert proc.returncode == 0, proc.stderr
    assert "megaflow arguments" in proc.stdout and "num_layers ....." in proc.stdout
    line = next(l for l in proc.stdout.splitlines() if "iteration        2/       2" in l)
    for field in ("consumed samples:            4", "elapsed time per iteration (ms):", "tokens per second:",
                  "learning rate:", "lm loss:", "grad norm:", "number of skipped iterations:   0"):
        assert field in line, field
    assert "validation loss at iteration 2 | lm loss value:" in proc.stdout and "lm loss PPL:" in proc.stdout


def test_config_errors_exit_before_training_and_name_the_flag():
    proc = run("-m", "megaflow", *TINY, "--train-iters", "2", "--num-attention-heads", "3")
    assert proc.returncode == 2
    assert "--num-attention-heads" in proc.stderr and "iteration" not in proc.stdout
    proc = run("pretrain_gpt.py", "--num-layer", "2")
    assert proc.returncode == 2 and "--num-layer" in proc.stderr


def test_help_lists_megatron_flags():
    proc = run("pretrain_gpt.py", "--help")
    assert proc.returncode == 0
    for flag in ("--tensor-model-parallel-size", "--lr-decay-style", "--use-distributed-optimizer"):
        assert flag in proc.stdout
