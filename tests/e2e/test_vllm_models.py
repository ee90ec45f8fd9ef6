"""vLLM serves megaflow's exports of today's model families — Mixtral and Qwen3-MoE (MoE), Qwen3 —
with the same greedy completion as megaflow's own generation, each checkpoint trained a few steps,
exported on the fly by tools/serve.py and run by vLLM for real (never skipped; see
tests/e2e/test_vllm_serving.py). The server log must name the architecture: vLLM ran it, not a fallback."""
import pytest

from tests.e2e.test_hf_qwen import QWEN3, QWEN3_MOE
from tests.hf_helpers import megaflow_greedy, train_tiny, vllm_greedy, vllm_serving

MAX_TOKENS = 12
PROMPTS = [[5, 6, 7, 8], [200, 3, 77, 41, 9, 120]]
MIXTRAL = ["--model-style", "llama", "--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "2",
           "--group-query-attention", "--num-query-groups", "1", "--num-experts", "4",
           "--moe-ffn-hidden-size", "128", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "0.01"]
MODELS = {"MixtralForCausalLM": MIXTRAL, "Qwen3ForCausalLM": QWEN3, "Qwen3MoeForCausalLM": QWEN3_MOE}


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(MODELS))
def test_vllm_serves_the_export_with_megaflow_greedy_completion(tmp_path, arch):
    ckpt = tmp_path / "ckpt"
    train_tiny(ckpt, MODELS[arch], iters=30)
    expected = [megaflow_greedy(ckpt, p, MAX_TOKENS) for p in PROMPTS]
    with vllm_serving(ckpt, tmp_path / "serve.log") as client:
        for prompt, want in zip(PROMPTS, expected):
            choice = vllm_greedy(client, "tiny", prompt, MAX_TOKENS)
            assert choice["token_ids"] == want, (arch, prompt, choice)
    served = (tmp_path / "serve.log").read_text()
    assert arch in served, served[-3000:]
