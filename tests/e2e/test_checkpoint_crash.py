"""Crash safety: a process saving checkpoints in a loop is killed with SIGKILL at random moments, 20
times (half of them with --async-save); after every kill the tracker names a checkpoint that loads whole
with the values of its iteration, or nothing, and every complete-looking iter_* folder is complete.
Children are forked from a forkserver that imported torch once, so a kill and restart costs ~0.1 s."""
import multiprocessing as mp
import os
import random
import time

from megaflow.checkpoint.format import CheckpointReader
from tests.e2e import crash_saver

KILLS = 20


def test_sigkill_at_random_moments_never_leaves_a_partial_latest_checkpoint(tmp_path):
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.e2e.crash_saver"])
    root, rng, built = str(tmp_path / "ckpt"), random.Random(8), crash_saver.build()
    seen, interrupted = [], 0
    for kill in range(KILLS):
        ready = ctx.Event()
        child = ctx.Process(target=crash_saver.saver_loop, args=(root, kill % 2 == 1, ready), daemon=True)
        child.start()
        assert ready.wait(timeout=60)
        time.sleep(rng.uniform(0.0, 0.5))   # one save takes ~0.1 s (36 MB, fsync'ed)
        child.kill()
        child.join()
        assert child.exitcode == -9, child.exitcode
        interrupted += any(name.endswith(".tmp") for name in os.listdir(root)) if os.path.isdir(root) else 0
        seen.append(crash_saver.check(root, built))
        for name in os.listdir(root) if os.path.isdir(root) else []:
            if name.startswith("iter_") and "." not in name:          # looks complete: must be
                reader = CheckpointReader(root, int(name[5:]))
                for fname in reader.meta["files"]:
                    reader.open(fname)                               # present, size as recorded
    assert seen[-1] is not None and seen[-1] >= 10, seen             # saves kept completing between kills
    assert seen == sorted(seen, key=lambda s: -1 if s is None else s)  # the tracker never went back
    assert interrupted >= 5, interrupted                              # most kills landed inside a save
