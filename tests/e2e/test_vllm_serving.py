"""vLLM serves a trained-and-exported megaflow model and decodes greedily exactly as megaflow does.

Runs vLLM for real (never skipped): vLLM is installed on first use into its own virtualenv
(megaflow/serving/vllm_env.py; CI runs `python -m megaflow.serving.vllm_env` before pytest).
tools/serve.py exports the checkpoint on the fly and starts the server on 127.0.0.1."""
import os
import signal
import subprocess
import sys
import time

import pytest

from megaflow.serving.server import VLLMServer
from megaflow.serving.vllm_env import ensure_vllm
from tests.hf_helpers import ROOT, TINY_LLAMA, generated_ids, run_tool, train_tiny
from tests.launch import free_port

MAX_TOKENS = 16
PROMPTS = [[5, 6, 7, 8], [200, 3, 77, 41, 9, 120]]


@pytest.mark.slow
def test_vllm_greedy_completion_equals_megaflow(tmp_path):
    ensure_vllm()
    ckpt = tmp_path / "ckpt"
    train_tiny(ckpt, TINY_LLAMA, iters=30)  # head_dim 64: vLLM's CPU attention needs >= 32
    expected = [generated_ids(run_tool("generate.py", "--load", ckpt, "--prompt-ids", " ".join(map(str, p)),
                                       "--max-new-tokens", MAX_TOKENS, "--greedy", "--ignore-eos"))
                for p in PROMPTS]

    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "serve.py"), "--load", str(ckpt),
                             "--port", str(port), "--served-model-name", "tiny", "--enforce-eager",
                             "--tensor-parallel-size", "1", "--", "--max-model-len", "128"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    client = VLLMServer("unused", port=port)  # only for its HTTP helpers
    client.proc, client.log_path = proc, str(tmp_path / "serve.log")
    try:
        start = time.monotonic()
        client.wait_ready(timeout=300)
        print(f"vLLM ready after {time.monotonic() - start:.0f} s")
        for prompt, want in zip(PROMPTS, expected):
            reply = client.request("/v1/completions", {
                "model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True}, timeout=120)
            choice = reply["choices"][0]
            assert choice["token_ids"] == want, (prompt, choice)
            # The exported WordLevel tokenizer spells ids as decimal words: the text says the same.
            assert [int(x) for x in choice["text"].split()] == want
        # Chat: the exported template renders each message's content ("ids as text") plus a newline.
        reply = client.request("/v1/chat/completions", {
            "model": "tiny", "messages": [{"role": "user", "content": " ".join(map(str, PROMPTS[0]))}],
            "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}, timeout=120)
        content = reply["choices"][0]["message"]["content"]
        assert [int(x) for x in content.split()] == expected[0], content
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # serve.py stops vLLM and its workers
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
