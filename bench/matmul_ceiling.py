"""The ceiling of the training benchmarks: a step's own matrix multiplications, timed alone.

Every linear layer [rows, n_in] -> [rows, n_out] of the step costs three torch.mm (forward, input
gradient, weight gradient) on its real shapes; causal attention's six batched products (Q K^T, P V
forward; dP, dQ, dK, dV backward) count at half their full size. The tensors are made once, when the
timer is built: allocating and freeing them at every call would make the step timed right after it
pay for the page faults. Benchmarks call the timer inside their rotation of runners, so the ceiling
sees the same machine state as the steps, and keep its median.
"""
import time

import torch


def _time(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def ceiling_timer(linears: dict, attention=None):
    """linears: {(rows, n_in, n_out): how many such layers}; attention: (layers, batch x heads, seq,
    head_dim) or None. Returns seconds(repeats=1): the time of all those products."""
    gemms = [(count, torch.randn(rows, n_in), torch.randn(n_out, n_in), torch.randn(rows, n_out))
             for (rows, n_in, n_out), count in linears.items() if count and rows]
    if attention is not None:
        layers, bh, seq, head_dim = attention
        q, p = torch.randn(bh, seq, head_dim), torch.randn(bh, seq, seq)

    def seconds(repeats: int = 1) -> float:
        total = 0.0
        for count, x, w, g in gemms:
            total += count * (_time(lambda: torch.mm(x, w.t()), repeats)      # forward
                              + _time(lambda: torch.mm(g, w), repeats)        # input gradient
                              + _time(lambda: torch.mm(g.t(), x), repeats))   # weight gradient
        if attention is not None:
            qk = _time(lambda: torch.bmm(q, q.transpose(1, 2)), repeats)  # Q K^T, and dP = dO V^T alike
            pv = _time(lambda: torch.bmm(p, q), repeats)                  # P V, dQ = dS K, dK = dS^T Q alike
            dv = _time(lambda: torch.bmm(p.transpose(1, 2), q), repeats)  # dV = P^T dO
            total += layers * 0.5 * (2 * qk + 3 * pv + dv)
        return total
    return seconds
