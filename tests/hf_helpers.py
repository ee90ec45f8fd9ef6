"""Shared by the conversion, generation and serving tests: tiny trained checkpoints and CLI runners."""
import contextlib
import os
import re
import signal
import subprocess
import sys
import time

from megaflow.config import parse_args
from megaflow.parallel import state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Mock data documents count 1, 2, 3, ... (mod vocab): a few dozen steps teach the model to continue.
TINY_LLAMA = ["--model-style", "llama", "--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "2",
              "--group-query-attention", "--num-query-groups", "1", "--ffn-hidden-size", "256"]
TINY_GPT2 = ["--model-style", "gpt2", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4"]


def train_tiny(save_dir, model_flags, iters=30, vocab=255, extra=()):
    """Train on mock data and save; returns the TrainResult. NullTokenizer: vocab ids + EOD = vocab."""
    args = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(vocab), "--seq-length", "64",
            "--max-position-embeddings", "128", "--micro-batch-size", "8", "--global-batch-size", "8",
            "--num-workers", "0", "--log-interval", "100", "--eval-interval", "1000", "--train-iters", str(iters),
            "--lr", "3e-3", "--lr-warmup-iters", "3", "--hidden-dropout", "0", "--attention-dropout", "0",
            "--save", str(save_dir), *model_flags, *map(str, extra)]
    from megaflow.training.trainer import pretrain
    try:
        return pretrain(parse_args(args))
    finally:
        state.destroy()


def run_tool(script, *args, timeout=300):
    """Run tools/<script> as a user would; returns stdout (raises with stderr on failure)."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def generated_ids(stdout: str) -> list:
    """The ids on tools/generate.py's `ids:` line."""
    match = re.search(r"^ids:(.*)$", stdout, re.MULTILINE)
    assert match, stdout
    return [int(x) for x in match.group(1).split()]


def megaflow_greedy(ckpt, prompt, max_new_tokens) -> list:
    """What tools/generate.py continues the prompt ids with, greedily, ignoring EOD."""
    return generated_ids(run_tool("generate.py", "--load", ckpt, "--prompt-ids", " ".join(map(str, prompt)),
                                  "--max-new-tokens", max_new_tokens, "--greedy", "--ignore-eos"))


@contextlib.contextmanager
def vllm_serving(ckpt, log_path, name="tiny", max_model_len=128):
    """tools/serve.py as a user runs it (exports the checkpoint on the fly, starts vLLM on 127.0.0.1 on a
    free port); yields the HTTP client; stops vLLM and its workers after."""
    from megaflow.serving.server import VLLMServer
    from megaflow.serving.vllm_env import ensure_vllm
    from tests.launch import free_port
    ensure_vllm()
    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "serve.py"), "--load", str(ckpt),
                             "--port", str(port), "--served-model-name", name, "--enforce-eager",
                             "--tensor-parallel-size", "1", "--", "--max-model-len", str(max_model_len)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    client = VLLMServer("unused", port=port)  # only for its HTTP helpers
    client.proc, client.log_path = proc, str(log_path)
    try:
        start = time.monotonic()
        client.wait_ready(timeout=300)
        print(f"vLLM ready after {time.monotonic() - start:.0f} s")
        yield client
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # serve.py stops vLLM and its workers
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()


def vllm_greedy(client, name, prompt, max_tokens) -> dict:
    """vLLM's greedy completion of the prompt ids (the choice: token_ids and text)."""
    reply = client.request("/v1/completions", {"model": name, "prompt": prompt, "max_tokens": max_tokens,
                                               "temperature": 0, "ignore_eos": True, "return_token_ids": True},
                           timeout=120)
    return reply["choices"][0]
