"""Host copies of one rank's checkpoint tensors, reused from one save to the next.

A save must copy this rank's parameters and optimizer state off the device before training changes
them: that copy is all an --async-save costs the training loop. The staging area keeps one host
buffer per tensor (page-locked when the tensors live on a GPU) and reuses it at every save, so a save
after the first allocates nothing and touches no fresh pages. Buffers are reused only after the
previous save's writer is done with them (CheckpointWriter.save waits for it first).

  GPU tensors   the copies are issued non_blocking in save() and a fence (parallel/device.py CopyFence)
                tells the writer thread when they have landed: the loop pays only for issuing them.
  CPU tensors   a copy is a memcpy the loop would pay in full. With defer_host_copies (the trainer's
                --async-save) save() only records them; the writer thread makes them first thing, and
                the training loop calls wait_staged() before it next changes a parameter or optimizer
                state (train_step, through the optimizer's before_update hooks): the copies then run
                while the next forward and backward do, and the loop waits only for what is left.
"""
from __future__ import annotations

import threading
import time

import torch

from megaflow.parallel import device as dev


class StagingFence:
    """What the writer thread waits on before writing: it makes the deferred host copies, marks them
    staged, then waits for the device copies to land."""

    def __init__(self, deferred: list, staged: threading.Event, device_fence: dev.CopyFence):
        self.deferred, self.staged, self.device_fence = deferred, staged, device_fence

    def wait(self) -> None:
        try:
            for buf, src in self.deferred:
                buf.copy_(src)
        finally:
            self.deferred = []
            self.staged.set()  # (after a failed copy too: the write reports the error, training goes on)
        self.device_fence.wait()


class HostStaging:
    def __init__(self, defer_host_copies: bool = False):
        self.buffers: dict[str, torch.Tensor] = {}
        self.source_device: torch.device | None = None
        self.defer_host_copies = defer_host_copies
        self._deferred: list = []
        self._staged = threading.Event()
        self._staged.set()
        self.waited = 0.0  # seconds wait_staged() held the training loop up since the last save()

    def copy(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """Start copying `tensor` into its host buffer; the buffer holds the values once the fence's
        wait() returns."""
        src = tensor.detach()
        buf = self.buffers.get(key)
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            buf = dev.host_buffer(src.shape, src.dtype, src.device)
            self.buffers[key] = buf
        if src.device.type != "cpu":
            self.source_device = src.device
            buf.copy_(src, non_blocking=True)
        elif self.defer_host_copies:
            self._deferred.append((buf, src))
        else:
            buf.copy_(src)
        return buf

    def fence(self) -> StagingFence:
        """Call after the last copy() of a save; hand the fence to the writer."""
        deferred, self._deferred = self._deferred, []
        self._staged = threading.Event()
        if not deferred:
            self._staged.set()
        self.waited = 0.0
        return StagingFence(deferred, self._staged, dev.CopyFence(self.source_device or torch.device("cpu")))

    def copies_pending(self) -> bool:
        return not self._staged.is_set()

    def wait_staged(self) -> None:
        """Block until the last save's deferred copies are made: call before changing saved state."""
        if not self._staged.is_set():
            start = time.perf_counter()
            self._staged.wait()
            self.waited += time.perf_counter() - start

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())
