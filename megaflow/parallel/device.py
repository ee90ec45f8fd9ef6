"""The one place megaflow talks to the accelerator API: which device and backend to use, its RNG
state, its name and size. Everything else asks here, so a new device type is one file's change."""
from __future__ import annotations

import os

import torch


def default_device() -> torch.device:
    """CUDA when a GPU exists, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def default_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def set_current(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)


def rng_state(device: torch.device) -> torch.Tensor:
    """The default generator's state on `device` (the one dropout draws from there)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def set_rng_state(new_state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(new_state, device)
    else:
        torch.set_rng_state(new_state)


def accelerator_rng_states() -> list | None:
    """Every GPU generator's state (None without GPUs), for checkpoints."""
    return torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def set_accelerator_rng_states(states) -> None:
    if states is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


class SideStream:
    """A second stream for communication that should overlap compute (ZeRO-3's parameter gathers).
    On CPU every method is a no-op: gloo's async handles already run beside compute."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def enter(self):
        """Context for work issued on the side stream, ordered after what the current stream queued."""
        import contextlib
        if self.stream is None:
            return contextlib.nullcontext()
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        return torch.cuda.stream(self.stream)

    def join(self, *tensors) -> None:
        """The current stream waits for the side stream; tensors made there may be freed after that."""
        if self.stream is None:
            return
        current = torch.cuda.current_stream(self.stream.device)
        current.wait_stream(self.stream)
        for t in tensors:
            t.record_stream(current)


def host_buffer(shape, dtype, source_device: torch.device) -> torch.Tensor:
    """A host tensor to copy `source_device` data into: page-locked for a GPU source (so the copy is a
    DMA that can run asynchronously), ordinary memory for a CPU source."""
    return torch.empty(shape, dtype=dtype, device="cpu", pin_memory=source_device.type == "cuda")


class CopyFence:
    """Marks the point after a batch of non_blocking device-to-host copies on `device`: wait() returns
    once they have landed (a CUDA event on the current stream; nothing to wait for on CPU, where
    copies are synchronous)."""

    def __init__(self, device: torch.device):
        self.event = None
        if device.type == "cuda":
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(device))

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()
