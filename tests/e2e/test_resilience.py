"""A job that heals itself and says what went wrong, on gloo with two processes under torchrun.

1. Automatic restart: rank 1 crashes at the start of iteration 4 (MEGAFLOW_INJECT_FAULT); torchrun
   (--max-restarts 1) restarts both ranks, which resume by themselves from --save's latest checkpoint
   (iteration 2): the log names the rank, the error and the checkpoint, and every iteration's loss
   equals the uninterrupted run's. The uninterrupted run also slows rank 1 down on purpose and must
   name it in its straggler report.
2. Hang: rank 1 stops making progress at iteration 3; rank 0's gradient all-reduce times out after
   --distributed-timeout-minutes 0.1; the first message names rank 1 as the rank that never arrived,
   both ranks' stacks and latest collectives are in the diagnostics directory, and the job ends
   within the timeout plus the diagnosis.
"""
import os
import re
import subprocess
import sys
import time

from tests.launch import ROOT, free_port

ARGS = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--num-layers", "2",
        "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "16", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--log-interval", "1", "--eval-interval", "0", "--device", "cpu",
        "--num-workers", "0", "--lr", "1e-3", "--lr-warmup-iters", "1"]


def torchrun(extra, env, restarts=0, timeout=300):
    # The c10d rendezvous (what torchrun's docs recommend for --max-restarts): restarts rendezvous again.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--max-restarts={restarts}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "pretrain_gpt.py", *ARGS, *extra]
    full_env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    OMP_NUM_THREADS="1", **env)
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)
    return proc, time.time() - start


def losses(stdout: str) -> dict:
    """iteration -> the lm loss printed for it (the last time, after a restart redid it)."""
    return {int(it): loss for it, loss in re.findall(r"iteration\s+(\d+)/\s*\d+ \|.*? lm loss: (\S+) \|", stdout)}


def test_a_crashed_rank_restarts_from_the_last_checkpoint_with_the_same_losses(tmp_path):
    common = ["--train-iters", "6", "--save-interval", "2"]
    crashed, _ = torchrun(common + ["--save", str(tmp_path / "a")], restarts=1,
                          env={"MEGAFLOW_INJECT_FAULT": "crash:rank=1:iteration=4"})
    out = crashed.stdout + crashed.stderr
    assert crashed.returncode == 0, out[-6000:]
    assert "restart 1 (torchrun --max-restarts): attempt 0 failed." in crashed.stdout, out[-6000:]
    assert re.search(r"rank 1 failed in iteration 4: InjectedFault: injected crash at iteration 4", crashed.stdout)
    assert f"resuming from checkpoint {tmp_path / 'a' / 'iter_0000002'} (iteration 2, redoing iterations 3-4)" \
        in crashed.stdout, crashed.stdout[-4000:]
    assert os.path.exists(tmp_path / "a" / "diagnostics" / "failure-attempt0-rank00001.json")

    steady, _ = torchrun(common + ["--save", str(tmp_path / "b"), "--log-straggler"], restarts=0,
                         env={"MEGAFLOW_INJECT_FAULT": "slow:rank=1:seconds=0.3"})
    assert steady.returncode == 0, (steady.stdout + steady.stderr)[-6000:]
    a, b = losses(crashed.stdout), losses(steady.stdout)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert a == b                       # the printed values (7 significant digits), every iteration
    # Straggler report at every log line, naming rank 1 (0.3 s slower per step than rank 0).
    reports = re.findall(r"straggler report, iterations (\d+)-(\d+):.*?max [\d.]+ \(rank (\d)\)", steady.stdout)
    assert [(int(x), int(y), int(r)) for x, y, r in reports] == [(i, i, 1) for i in range(1, 7)], steady.stdout[-3000:]
    assert len(re.findall(r"WARNING: straggler: rank 1 takes [\d.]+ ms per step", steady.stdout)) == 6
    assert "WARNING: straggler: rank 0" not in steady.stdout


TIMEOUT_MIN = 0.1  # --distributed-timeout-minutes: 6 s


def test_a_hung_rank_is_named_and_every_rank_writes_its_stack_and_collectives(tmp_path):
    diag = tmp_path / "diag"
    started = time.time()
    proc, elapsed = torchrun(["--train-iters", "1000", "--distributed-timeout-minutes", str(TIMEOUT_MIN),
                              "--diagnostics-dir", str(diag)],
                             env={"MEGAFLOW_INJECT_FAULT": "hang:rank=1:iteration=3"}, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-4000:]
    first = next(line for line in proc.stderr.splitlines() if "megaflow:" in line)
    assert re.search(r"megaflow: Rank\(s\) 1 never arrived at all_reduce #\d+ on group \[0, 1\]", first), out[-4000:]
    assert "No rank is lost" in first                                     # rank 1 is alive, only stuck
    rank0, rank1 = (diag / "rank00000-attempt0.txt").read_text(), (diag / "rank00001-attempt0.txt").read_text()
    assert re.search(r"still inside \(or failed in\): all_reduce on group \[0, 1\] seq \d+", rank0)
    assert "finish_grad_sync" in rank0                                    # its traceback: the gradient sync
    assert re.search(r'faults\.py", line \d+ in before_step', rank1)     # where rank 1's main thread is stuck
    assert re.search(r"all_reduce +group \[0, 1\] seq \d+", rank1)        # its latest collectives
    # The job ends within the timeout (6 s), the diagnosis (2.5 heartbeats of 0.5 s) and torchrun
    # stopping the hung rank, counted from the moment rank 0 issued the collective that never completed.
    waited_since = re.findall(r"(\d\d):(\d\d):(\d\d)\.(\d{3}) all_reduce", rank0)[-1]
    h, m, s, ms = map(int, waited_since)
    day = time.localtime(started + elapsed)
    end_seconds = day.tm_hour * 3600 + day.tm_min * 60 + day.tm_sec + (started + elapsed) % 1
    waited = (end_seconds - (h * 3600 + m * 60 + s + ms / 1000)) % 86400
    assert TIMEOUT_MIN * 60 <= waited < TIMEOUT_MIN * 60 + 1.25 + 12, waited
