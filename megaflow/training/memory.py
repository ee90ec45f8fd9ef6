"""Bytes per rank held by model states: parameters, gradients, optimizer state (exact: the optimizer
knows its buffers, shards and main parameters; see optim/distrib_optimizer.py for the formulas)."""
from __future__ import annotations


def model_state_bytes(model, optimizer) -> dict:
    return optimizer.memory_bytes()


def memory_report(model, optimizer) -> str:
    b = model_state_bytes(model, optimizer)
    mib = 1024 ** 2
    dp = optimizer.sync.dp_size
    kind = f"ZeRO-{optimizer.zero_stage} sharded, DP={dp}" if optimizer.sharded else f"replicated, DP={dp}"
    return (f"model states on this rank: {b['num_parameters']:,} parameters | parameters "
            f"{b['parameters'] / mib:.2f} MiB | gradients {b['gradients'] / mib:.2f} MiB | optimizer "
            f"{b['optimizer'] / mib:.2f} MiB (fp32 main params {b['main_params'] / mib:.2f} MiB + state "
            f"{b['optimizer_state'] / mib:.2f} MiB, {kind})")
