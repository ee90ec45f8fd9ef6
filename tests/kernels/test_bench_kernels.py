"""bench/kernels.py needs a GPU; on a machine without one it must say so and succeed."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(torch.cuda.is_available(), reason="measures for real on a GPU")
def test_bench_without_gpu_exits_zero():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "kernels.py")], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr
    assert "no CUDA GPU" in r.stdout
