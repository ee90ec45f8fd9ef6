"""vLLM serves megaflow's exports of today's model families — Mixtral, Qwen3-MoE and DeepSeek-V3 (MoE), Qwen3 —
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
# DeepSeek-V3's whole routing (sigmoid, expert bias, 4 groups choosing 2, top-4, scaled weights, a shared
# expert) after a dense layer, with a query latent; vLLM's CPU MLA needs kv_lora_rank + qk_rope_head_dim =
# 576 and 16-bit weights (ENVIRONMENT.md): tools/serve.py serves the fp32 export in bfloat16 by itself.
# 80 steps teach the built-in corpus's counting well enough that bf16 rounding cannot flip a greedy
# token (margins > 3 nats, measured).
DEEPSEEK_V3 = ["--model-style", "llama", "--num-layers", "3", "--hidden-size", "128", "--num-attention-heads", "2",
               "--ffn-hidden-size", "256", "--multi-latent-attention", "--q-lora-rank", "64", "--kv-lora-rank", "512",
               "--qk-head-dim", "32", "--qk-pos-emb-head-dim", "64", "--v-head-dim", "32",
               "--num-experts", "8", "--moe-ffn-hidden-size", "64", "--moe-router-topk", "4",
               "--moe-layer-freq", "([0]*1+[1]*2)", "--moe-router-score-function", "sigmoid",
               "--moe-router-enable-expert-bias", "--moe-router-num-groups", "4", "--moe-router-group-topk", "2",
               "--moe-router-topk-scaling-factor", "2.5", "--moe-shared-expert-intermediate-size", "128",
               "--moe-aux-loss-coeff", "0.01"]
MODELS = {"MixtralForCausalLM": MIXTRAL, "Qwen3ForCausalLM": QWEN3, "Qwen3MoeForCausalLM": QWEN3_MOE,
          "DeepseekV3ForCausalLM": DEEPSEEK_V3}
ITERATIONS = {"DeepseekV3ForCausalLM": 80}   # training steps (else 30)


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(MODELS))
def test_vllm_serves_the_export_with_megaflow_greedy_completion(tmp_path, arch):
    ckpt = tmp_path / "ckpt"
    train_tiny(ckpt, MODELS[arch], iters=ITERATIONS.get(arch, 30))
    expected = [megaflow_greedy(ckpt, p, MAX_TOKENS) for p in PROMPTS]
    with vllm_serving(ckpt, tmp_path / "serve.log") as client:
        for prompt, want in zip(PROMPTS, expected):
            choice = vllm_greedy(client, "tiny", prompt, MAX_TOKENS)
            assert choice["token_ids"] == want, (arch, prompt, choice)
    served = (tmp_path / "serve.log").read_text()
    assert arch in served, served[-3000:]
    if arch == "DeepseekV3ForCausalLM":   # multi-latent attention: served in 16 bits from the fp32 export
        assert "dtype=torch.bfloat16" in served, served[-3000:]
