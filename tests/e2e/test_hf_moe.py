"""MoE ⇄ Hugging Face Mixtral: a trained tiny Mixtral-shaped megaflow checkpoint exports to a folder that
transformers' MixtralForCausalLM loads with the same logits (fp32) and the same greedy continuation;
importing that folder back at TP=2 × PP=2 and exporting again gives identical tensors; models Mixtral
cannot express are refused with the reason."""
import pytest
import torch
from safetensors.torch import load_file

from megaflow.checkpoint.convert import export_to_hf, import_from_hf
from megaflow.checkpoint.hf import ConversionError, hf_architecture
from megaflow.config import parse_args
from megaflow.inference.generation import generate, load_inference_model
from tests.hf_helpers import train_tiny

import transformers  # a dev dependency: a missing one must fail, not skip

MIXTRAL = ["--model-style", "llama", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
           "--group-query-attention", "--num-query-groups", "2", "--num-experts", "4", "--moe-ffn-hidden-size",
           "48", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "0.01"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixtral")
    train_tiny(root / "ckpt", MIXTRAL, iters=20)
    hf_config = export_to_hf(str(root / "ckpt"), str(root / "hf"))
    return root, hf_config


def test_export_matches_transformers_mixtral(exported):
    root, hf_config = exported
    assert hf_config["architectures"] == ["MixtralForCausalLM"] and hf_config["num_local_experts"] == 4
    hf = transformers.AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32, local_files_only=True)
    hf.eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    cfg, model = load_inference_model(str(root / "ckpt"))
    for prompt in ([10, 11, 12, 13, 14], [201, 7, 64, 3, 150, 22, 99, 5]):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, model(ids)[..., :cfg.vocab_size], rtol=1e-4, atol=1e-4)
        ours = generate(model, prompt, 16)
        theirs = hf.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(prompt):].tolist()
        assert ours == theirs, (prompt, ours, theirs)


def test_import_at_tp2_pp2_and_export_again_is_identical(exported, tmp_path):
    root, _ = exported
    cfg = import_from_hf(str(root / "hf"), str(tmp_path / "ckpt"), tp=2, pp=2)
    assert cfg.moe.num_experts == 4 and cfg.moe.moe_ffn_hidden_size == 48
    export_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf2"))
    first, second = load_file(root / "hf" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    assert first.keys() == second.keys() and any("block_sparse_moe.experts.3.w2" in k for k in first)
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("flags, reason", [
    (["--moe-layer-freq", "2"], "every layer must be an MoE layer"),
    (["--moe-router-score-function", "sigmoid"], "softmax"),
    (["--moe-shared-expert-intermediate-size", "32"], "--moe-shared-expert-intermediate-size"),
])
def test_models_mixtral_cannot_express_are_refused(flags, reason):
    cfg = parse_args(MIXTRAL + flags)
    with pytest.raises(ConversionError, match=reason):
        hf_architecture(cfg)
