"""Test setup shared by every suite.

Without a GPU, Triton kernels run in its interpreter, which must be switched on before any
@triton.jit decorator runs, so before megaflow is imported (ENVIRONMENT.md)."""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
