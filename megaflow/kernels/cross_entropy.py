"""Per-token cross entropy over a (possibly large) vocabulary, computed in fp32."""
from __future__ import annotations

import torch.nn.functional as F

from megaflow.kernels.dispatch import resolve_backend


def cross_entropy_reference(logits, labels, label_smoothing=0.0):
    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), reduction="none",
                           label_smoothing=label_smoothing).view(labels.shape)


def cross_entropy(logits, labels, label_smoothing=0.0, backend="auto"):
    """logits [..., vocab], labels [...] -> per-token loss [...] (fp32)."""
    backend = resolve_backend(backend, logits)
    if backend == "torch":
        return cross_entropy_reference(logits, labels, label_smoothing)
    raise NotImplementedError(f"cross-entropy backend {backend!r}")
