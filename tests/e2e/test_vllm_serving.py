"""vLLM serves a trained-and-exported megaflow model and decodes greedily exactly as megaflow does.

Runs vLLM for real (never skipped): vLLM is installed on first use into its own virtualenv
(megaflow/serving/vllm_env.py; CI runs `python -m megaflow.serving.vllm_env` before pytest).
tools/serve.py exports the checkpoint on the fly and starts the server on 127.0.0.1. Llama here (with
the chat endpoint); tests/e2e/test_vllm_models.py serves the other exported architectures."""
import pytest

from tests.hf_helpers import TINY_LLAMA, megaflow_greedy, train_tiny, vllm_greedy, vllm_serving

MAX_TOKENS = 16
PROMPTS = [[5, 6, 7, 8], [200, 3, 77, 41, 9, 120]]


@pytest.mark.slow
def test_vllm_greedy_completion_equals_megaflow(tmp_path):
    ckpt = tmp_path / "ckpt"
    train_tiny(ckpt, TINY_LLAMA, iters=30)  # head_dim 64: vLLM's CPU attention needs >= 32
    expected = [megaflow_greedy(ckpt, p, MAX_TOKENS) for p in PROMPTS]
    with vllm_serving(ckpt, tmp_path / "serve.log") as client:
        for prompt, want in zip(PROMPTS, expected):
            choice = vllm_greedy(client, "tiny", prompt, MAX_TOKENS)
            assert choice["token_ids"] == want, (prompt, choice)
            # The exported WordLevel tokenizer spells ids as decimal words: the text says the same.
            assert [int(x) for x in choice["text"].split()] == want
        # Chat: the exported template renders each message's content ("ids as text") plus a newline.
        reply = client.request("/v1/chat/completions", {
            "model": "tiny", "messages": [{"role": "user", "content": " ".join(map(str, PROMPTS[0]))}],
            "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}, timeout=120)
        content = reply["choices"][0]["message"]["content"]
        assert [int(x) for x in content.split()] == expected[0], content
