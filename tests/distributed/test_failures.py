"""A rank that dies or freezes ends the run with an error naming it, on every other rank, within the
collective timeout; no rank hangs.

Four `python pretrain_gpt.py` processes are started the way torchrun starts workers (RANK, WORLD_SIZE,
MASTER_ADDR/PORT), without an agent that would kill the survivors for us: like ranks on other nodes,
they must find out by themselves. Layout PP = 2 × DP = 2, so the victim's peers meet it both in
pipeline transfers and in the data-parallel all-reduce.
"""
import os
import re
import signal
import subprocess
import sys
import time

from tests.launch import ROOT, free_port

TIMEOUT_MIN = 0.1  # --distributed-timeout-minutes: 6 s
# A survivor waits at most one timeout for a collective, 2.5 heartbeats (0.5 s) to diagnose, and one
# timeout + 4 heartbeats for the others to finish theirs: 6 + 1.25 + 8 s. Slack for a loaded machine.
LIMIT = 2 * TIMEOUT_MIN * 60 + 3.25 + 15
ARGS = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--num-layers", "2",
        "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "16", "--micro-batch-size", "2",
        "--global-batch-size", "8", "--pipeline-model-parallel-size", "2", "--train-iters", "100000",
        "--log-interval", "1", "--eval-interval", "0", "--device", "cpu",
        "--distributed-timeout-minutes", str(TIMEOUT_MIN)]


def launch(tmp_path, world=4):
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        out = open(tmp_path / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "pretrain_gpt.py", *ARGS, "--diagnostics-dir",
                                       str(tmp_path / "diagnostics")], cwd=ROOT, env=env,
                                      stdout=out, stderr=subprocess.STDOUT))
    return procs


def wait_for_iteration(tmp_path, n, procs, limit=120):
    """Until the last rank (it logs) has printed iteration n."""
    deadline = time.time() + limit
    pattern = re.compile(rf"iteration\s+{n}/")
    while time.time() < deadline:
        if pattern.search((tmp_path / "rank3.log").read_text()):
            return
        assert all(p.poll() is None for p in procs), "a rank exited before the failure was injected"
        time.sleep(0.2)
    raise AssertionError("training did not reach the iteration")


def finish(procs, survivors, limit):
    start = time.time()
    codes = {}
    for r in survivors:
        try:
            codes[r] = procs[r].wait(timeout=max(1.0, limit - (time.time() - start)))
        except subprocess.TimeoutExpired:
            codes[r] = None
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    return codes, time.time() - start


def reports(tmp_path) -> list:
    """Ranks that wrote a report (megaflow/parallel/flight_recorder.py) to the diagnostics directory."""
    return sorted(int(p.name[4:9]) for p in (tmp_path / "diagnostics").glob("rank*-attempt0.txt"))


def test_a_killed_rank_is_named_by_every_other_rank(tmp_path):
    procs = launch(tmp_path)
    wait_for_iteration(tmp_path, 2, procs)
    procs[1].kill()  # SIGKILL: no chance to say goodbye
    codes, elapsed = finish(procs, [0, 2, 3], limit=LIMIT + 10)
    for r in (0, 2, 3):
        log = (tmp_path / f"rank{r}.log").read_text()
        assert codes[r] not in (None, 0), f"rank {r} did not exit with an error:\n{log[-3000:]}"
        assert re.search(r"Lost rank\(s\) 1:", log), f"rank {r} did not name rank 1:\n{log[-3000:]}"
    assert elapsed < LIMIT, elapsed
    assert reports(tmp_path) == [0, 2, 3]  # stacks and latest collectives of every live rank


def test_a_frozen_rank_times_out_and_is_named(tmp_path):
    procs = launch(tmp_path)
    wait_for_iteration(tmp_path, 2, procs)
    os.kill(procs[2].pid, signal.SIGSTOP)  # alive but silent: sockets stay open, only timeouts end waits
    codes, elapsed = finish(procs, [0, 1, 3], limit=LIMIT + 10)  # also kills the frozen rank
    for r in (0, 1, 3):
        log = (tmp_path / f"rank{r}.log").read_text()
        assert codes[r] not in (None, 0), f"rank {r} did not exit with an error:\n{log[-3000:]}"
        assert re.search(r"Lost rank\(s\) 2:", log), f"rank {r} did not name rank 2:\n{log[-3000:]}"
    assert elapsed < LIMIT, elapsed
    assert reports(tmp_path) == [0, 1, 3]  # the frozen rank's heartbeat thread is frozen too
