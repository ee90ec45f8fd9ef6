"""Qwen2, Qwen3 and Qwen3-MoE ⇄ Hugging Face: a tiny trained megaflow checkpoint of each exports to a
folder that transformers loads as that architecture, with the same logits (fp32, ≤1e-4) and the same
greedy continuation; importing the folder back at TP=2 × PP=2 and exporting again gives identical
tensors; models the Qwen classes cannot express are refused with the reason."""
import json

import pytest
import torch
from safetensors.torch import load_file

from megaflow.checkpoint.convert import export_to_hf, import_from_hf
from megaflow.checkpoint.hf import ConversionError, hf_architecture
from megaflow.config import parse_args
from megaflow.inference.generation import generate, load_inference_model
from tests.hf_helpers import train_tiny

import transformers  # a dev dependency: a missing one must fail, not skip

# head_dim 64 (vLLM's CPU attention needs >= 32: tests/e2e/test_vllm_qwen.py serves these shapes)
BASE = ["--model-style", "llama", "--num-layers", "2", "--hidden-size", "256", "--num-attention-heads", "4",
        "--group-query-attention", "--num-query-groups", "2", "--ffn-hidden-size", "256",
        "--rotary-base", "1000000"]
QWEN2 = BASE + ["--add-qkv-bias"]
QWEN3 = BASE + ["--qk-layernorm"]
QWEN3_MOE = QWEN3 + ["--num-experts", "4", "--moe-ffn-hidden-size", "64", "--moe-router-topk", "2",
                     "--moe-layer-freq", "[0,1]", "--moe-aux-loss-coeff", "0.01"]
MODELS = {"Qwen2ForCausalLM": QWEN2, "Qwen3ForCausalLM": QWEN3, "Qwen3MoeForCausalLM": QWEN3_MOE}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = {}
    for arch, flags in MODELS.items():
        root = tmp_path_factory.mktemp(arch)
        train_tiny(root / "ckpt", flags, iters=20)
        out[arch] = root, export_to_hf(str(root / "ckpt"), str(root / "hf"))
    return out


@pytest.mark.parametrize("arch", list(MODELS))
def test_export_matches_transformers(exported, arch):
    root, hf_config = exported[arch]
    assert hf_config["architectures"] == [arch] and hf_config["rope_parameters"]["rope_theta"] == 1e6
    hf = transformers.AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32, local_files_only=True)
    hf.eval()
    assert type(hf).__name__ == arch
    if arch == "Qwen3MoeForCausalLM":                      # the leading dense layer stayed dense
        assert hf_config["mlp_only_layers"] == [0] and hf_config["norm_topk_prob"] is True
        assert type(hf.model.layers[0].mlp).__name__ == "Qwen3MoeMLP"
    cfg, model = load_inference_model(str(root / "ckpt"))
    for prompt in ([10, 11, 12, 13, 14], [201, 7, 64, 3, 150, 22, 99, 5]):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, model(ids)[..., :cfg.vocab_size], rtol=1e-4, atol=1e-4)
        ours = generate(model, prompt, 16)
        theirs = hf.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(prompt):].tolist()
        assert ours == theirs, (prompt, ours, theirs)


@pytest.mark.parametrize("arch", list(MODELS))
def test_import_at_tp2_pp2_and_export_again_is_identical(exported, arch, tmp_path):
    root, _ = exported[arch]
    cfg = import_from_hf(str(root / "hf"), str(tmp_path / "ckpt"), tp=2, pp=2)
    assert hf_architecture(cfg) == arch and cfg.model.rotary_base == 1000000
    export_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf2"))
    first, second = load_file(root / "hf" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    names = " ".join(first)
    assert ("self_attn.q_norm.weight" in names) == (arch != "Qwen2ForCausalLM")
    assert ("self_attn.q_proj.bias" in names) == (arch == "Qwen2ForCausalLM")
    assert ("mlp.experts.3.down_proj.weight" in names) == (arch == "Qwen3MoeForCausalLM")
    written = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert {k: written[k] for k in ("model_type", "architectures")} == \
        {k: json.loads((root / "hf" / "config.json").read_text())[k] for k in ("model_type", "architectures")}


@pytest.mark.parametrize("flags, reason", [
    (QWEN3 + ["--add-qkv-bias"], "--add-qkv-bias"),
    (BASE[:1] + ["gpt2"] + BASE[2:] + ["--qk-layernorm"], "RMSNorm, rope and swiglu"),
    (QWEN3_MOE + ["--moe-router-score-function", "sigmoid"], "softmax"),
    (QWEN3_MOE + ["--moe-shared-expert-intermediate-size", "32"], "--moe-shared-expert-intermediate-size"),
    (QWEN2 + ["--kv-channels", "32"], "--kv-channels"),
])
def test_models_qwen_cannot_express_are_refused(flags, reason):
    cfg = parse_args(flags)
    with pytest.raises(ConversionError, match=reason):
        hf_architecture(cfg)
