"""parallel/health.py's diagnosis on an in-memory store: silent ranks are lost, ranks that wrote a reason
are quoted, and with nobody lost the ranks behind the others' iteration are named."""
import torch.distributed as dist

from megaflow.parallel.health import Monitor, interval_for


def test_interval_follows_the_timeout_within_bounds():
    assert interval_for(10.0) == 10.0 and interval_for(0.1) == 0.5 and interval_for(1.0) == 3.0


def test_a_silent_rank_is_lost_and_a_failed_one_is_quoted():
    store = dist.HashStore()
    me, alive = Monitor(store, 0, 4, 0.01), Monitor(store, 1, 4, 0.01)
    store.set(f"{me.prefix}exit/3", "ValueError: bad shard")  # rank 3 stopped and said why
    try:
        text = me.diagnose(RuntimeError("Connection closed by peer"))
    finally:
        me.stop(), alive.stop()
    assert text.startswith("rank 0 stopping after: RuntimeError: Connection closed by peer.")
    assert "Lost rank(s) 2:" in text and "Rank 3 stopped on its own (ValueError: bad shard)" in text
    assert "Lost rank(s) 2, " not in text and "1" not in text.split("Lost rank(s)")[1].split(":")[0]


def test_with_nobody_lost_the_rank_behind_is_named():
    store = dist.HashStore()
    monitors = [Monitor(store, r, 3, 0.01) for r in range(3)]
    for r, it in enumerate([7, 6, 7]):
        monitors[r].iteration(it)
    try:
        text = monitors[0].diagnose(RuntimeError("Timed out waiting 6000ms"))
    finally:
        for m in monitors:
            m.stop()
    assert "No rank is lost; rank(s) 1 are behind (iteration 6)" in text


def test_keys_of_an_earlier_torchrun_attempt_do_not_count():
    store = dist.HashStore()  # torchrun's restarts reuse one store: attempt 0 left its keys behind
    old = [Monitor(store, r, 2, 0.01, attempt=0) for r in range(2)]
    for m in old:
        m.stop()
    store.set(f"{old[1].prefix}exit/1", "ValueError: from the first attempt")
    store.set(f"{old[1].prefix}dump", "rank 1: a report request of the first attempt")
    me = Monitor(store, 0, 2, 0.01, attempt=1)
    try:
        assert not me._reported  # no report written for the old request
        text = me.diagnose(RuntimeError("Connection closed by peer"))
    finally:
        me.stop()
    assert "first attempt" not in text and "Lost rank(s) 1:" in text
