"""Host copies of one rank's checkpoint tensors, reused from one save to the next.

A save must copy this rank's parameters and optimizer state off the device before training changes
them: that copy is all an --async-save costs the training loop. The staging area keeps one host
buffer per tensor (page-locked when the tensors live on a GPU) and reuses it at every save, so a save
after the first allocates nothing and touches no fresh pages; on a GPU the copies are issued
non_blocking and a fence (parallel/device.py CopyFence) tells the writer when they have landed, so the
training loop only pays for issuing them. Buffers are reused only after the previous save's writer is
done with them (CheckpointWriter.save waits for it first).
"""
from __future__ import annotations

import torch

from megaflow.parallel import device as dev


class HostStaging:
    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}
        self.source_device: torch.device | None = None

    def copy(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """Start copying `tensor` into its host buffer; the buffer holds the values once fence() waits."""
        src = tensor.detach()
        buf = self.buffers.get(key)
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            buf = dev.host_buffer(src.shape, src.dtype, src.device)
            self.buffers[key] = buf
        if src.device.type != "cpu":
            self.source_device = src.device
        buf.copy_(src, non_blocking=src.device.type != "cpu")
        return buf

    def fence(self) -> dev.CopyFence:
        """Call after the last copy() of a save: its wait() returns once every copy has landed."""
        return dev.CopyFence(self.source_device or torch.device("cpu"))

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())
