"""Every Triton kernel compiles for an Ampere GPU (sm80), and the attention kernels use tensor
cores and pipelined (cp.async) loads there: checked on CPU by compiling without running, in a
subprocess without TRITON_INTERPRET (see gpu_compile.py; `--arch 80 90` checks Hopper too)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_kernels_compile_for_ampere():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "kernels", "gpu_compile.py"), "--arch", "80"],
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("ok ")]
    assert len(lines) == 17, r.stdout
    for ln in lines:
        if "attention fwd" in ln or "attention dkdv" in ln or "attention dq" in ln:
            assert "tensor cores mma.sync" in ln and "cp.async yes" in ln, ln
