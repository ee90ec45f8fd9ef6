"""Random streams for tensor parallelism, and activation recompute that replays them bit for bit.

Two streams per rank (Megatron semantics, FORMATS.md §3):
    default         torch's default generator of the training device, seeded with `seed` (the trainer
                    already adds 100·pp_rank). Identical on every TP rank, so dropout on activations
                    that are replicated across TP (hidden dropout without sequence parallelism) draws
                    the same mask everywhere, as it must.
    model-parallel  seed + 2718 + tp_rank, held by the tracker. Used, through `fork()`, for dropout on
                    activations that differ across TP ranks: attention probabilities (each rank holds
                    other heads) and, with sequence parallelism, every dropout in the sequence-sharded
                    regions (each rank holds other tokens).

`fork()` swaps the tracker's state into the default generator, runs the block, saves the advanced state
back into the tracker and restores the default generator, so the default stream is not consumed.

`checkpoint(fn, *args)` is torch.utils.checkpoint (non-reentrant) plus the tracker: the recompute in
backward sees the default *and* model-parallel states the forward saw, so dropout masks are identical.
"""
from __future__ import annotations

import contextlib

import torch
import torch.utils.checkpoint as torch_checkpoint

from megaflow.parallel import device as device_mod
from megaflow.parallel import state

MODEL_PARALLEL_RNG = "model-parallel-rng"
MODEL_PARALLEL_SEED_OFFSET = 2718


def _device() -> torch.device:
    return state.get().device


def get_device_rng_state(device: torch.device | None = None) -> torch.Tensor:
    """The default generator's state on the training device (the one dropout draws from)."""
    return device_mod.rng_state(device or _device())


def set_device_rng_state(new_state: torch.Tensor, device: torch.device | None = None) -> None:
    device_mod.set_rng_state(new_state, device or _device())


def _seeded_state(seed: int, device: torch.device) -> torch.Tensor:
    """The generator state `manual_seed(seed)` would give, without touching the default generator."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen.get_state()


class RNGStatesTracker:
    """Named generator states that can be swapped into the default generator with fork(name)."""

    def __init__(self):
        self._states: dict[str, torch.Tensor] = {}
        self._seeds: set[int] = set()
        self._active: set[str] = set()

    def reset(self) -> None:
        self._states, self._seeds, self._active = {}, set(), set()

    def add(self, name: str, seed: int) -> None:
        if seed in self._seeds:
            raise ValueError(f"seed {seed} already used by another RNG stream")
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} already exists")
        self._seeds.add(seed)
        self._states[name] = _seeded_state(seed, _device())

    def get_states(self) -> dict[str, torch.Tensor]:
        """Copies of the states (safe to keep while the streams advance)."""
        return {name: s.clone() for name, s in self._states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._states = {name: s.clone() for name, s in states.items()}

    def names(self) -> list[str]:
        return list(self._states)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        if name not in self._states:
            raise KeyError(f"RNG stream {name!r} is not seeded (call model_parallel_seed first)")
        if name in self._active:  # already inside this stream: keep drawing from it
            yield
            return
        device = _device()
        saved_default = get_device_rng_state(device)
        set_device_rng_state(self._states[name], device)
        self._active.add(name)
        try:
            yield
        finally:
            self._active.discard(name)
            self._states[name] = get_device_rng_state(device)
            set_device_rng_state(saved_default, device)


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    return _TRACKER


def model_parallel_seed(seed: int) -> None:
    """Seed both streams: default = seed, model-parallel = seed + 2718 + tp_rank.

    `seed` is the per-pipeline-stage seed (the trainer passes seed + 100·pp_rank)."""
    st = state.get()
    torch.manual_seed(seed)  # seeds every device's default generator
    _TRACKER.reset()
    _TRACKER.add(MODEL_PARALLEL_RNG, seed + MODEL_PARALLEL_SEED_OFFSET + st.tp_rank)


def _ensure_seeded() -> None:
    # A model used outside the trainer (tests, tools) still gets a valid model-parallel stream.
    if MODEL_PARALLEL_RNG not in _TRACKER._states:
        _TRACKER.add(MODEL_PARALLEL_RNG, torch.initial_seed() + MODEL_PARALLEL_SEED_OFFSET
                     + state.get().tp_rank)


def dropout(x: torch.Tensor, p: float, training: bool, model_parallel: bool = False) -> torch.Tensor:
    """F.dropout on the default stream, or on the model-parallel stream when the activation differs
    across TP ranks (model_parallel=True). A no-op (and no RNG use) when p == 0 or not training."""
    if not training or p == 0.0:
        return x
    if not model_parallel:
        return torch.nn.functional.dropout(x, p, True)
    with model_parallel_rng():
        return torch.nn.functional.dropout(x, p, True)


def model_parallel_rng():
    """Context: random ops inside draw from this TP rank's model-parallel stream."""
    _ensure_seeded()
    return _TRACKER.fork(MODEL_PARALLEL_RNG)


def _tracker_context_fn():
    """Contexts for torch.utils.checkpoint: the forward one records the tracker's states, the recompute
    one replays them during the recompute and puts back the states current at backward time."""
    saved = {}

    @contextlib.contextmanager
    def forward_ctx():
        saved["states"] = _TRACKER.get_states()
        yield

    @contextlib.contextmanager
    def recompute_ctx():
        now = _TRACKER.get_states()
        _TRACKER.set_states(saved["states"])
        try:
            yield
        finally:
            _TRACKER.set_states(now)

    return forward_ctx(), recompute_ctx()


def checkpoint(fn, *args):
    """Run fn(*args) without keeping its activations; backward recomputes them with the same default
    and model-parallel RNG states, so dropout masks are reproduced exactly (non-reentrant autograd)."""
    if torch.compiler.is_compiling():
        # Inside a compiled block (--compile) the recompute is part of the compiled graph, whose RNG
        # ops are replayed by torch's functionalized RNG; dynamo accepts no other context_fn.
        return torch_checkpoint.checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True)
    return torch_checkpoint.checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True,
                                       context_fn=_tracker_context_fn)
