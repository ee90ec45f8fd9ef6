"""DeepSeek-V3 ⇄ Hugging Face: tiny trained megaflow checkpoints with multi-latent attention export to a
folder transformers loads as DeepseekV3ForCausalLM, with the same logits (fp32, ≤1e-4) and greedy
continuation: one with DeepSeek-V3's whole shape (query latent, YaRN, a leading dense layer, then MoE
layers with sigmoid routing, expert bias, group-limited choice, scaled weights and a shared expert, and a
multi-token-prediction module, kept in megaflow's checkpoint and dropped on export as transformers has none,
or with --export-mtp written in DeepSeek's own layout and imported back),
one dense without a query latent and with plain RoPE. Importing the folder back at TP=2 × PP=2 and
exporting again gives identical tensors; models DeepSeek-V3 cannot express are refused."""
import json

import pytest
import torch
from safetensors.torch import load_file

from megaflow.checkpoint.convert import export_to_hf, import_from_hf, training_flags
from megaflow.checkpoint.format import CheckpointReader
from megaflow.checkpoint.hf import ConversionError, hf_architecture
from megaflow.config import parse_args
from megaflow.inference.generation import generate, load_inference_model
from tests.hf_helpers import train_tiny

import transformers  # a dev dependency: a missing one must fail, not skip

MLA = ["--model-style", "llama", "--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4",
       "--ffn-hidden-size", "256", "--multi-latent-attention", "--kv-lora-rank", "32", "--qk-head-dim", "32",
       "--qk-pos-emb-head-dim", "16", "--v-head-dim", "24"]
YARN = ["--rope-type", "yarn", "--rotary-scaling-factor", "4", "--original-max-position-embeddings", "32",
        "--mscale", "0.9", "--mscale-all-dim", "1.0"]
ROUTING = ["--num-experts", "8", "--moe-ffn-hidden-size", "32", "--moe-router-topk", "4",
           "--moe-layer-freq", "([0]*1+[1]*3)", "--moe-router-score-function", "sigmoid",
           "--moe-router-enable-expert-bias", "--moe-router-num-groups", "4", "--moe-router-group-topk", "2",
           "--moe-shared-expert-intermediate-size", "64", "--moe-router-topk-scaling-factor", "2.5",
           "--moe-aux-loss-coeff", "0.001"]
DEEPSEEK_V3 = MLA + ["--q-lora-rank", "48"] + YARN + ROUTING + ["--mtp-num-layers", "1"]
MODELS = {"v3": DEEPSEEK_V3, "dense": MLA}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = {}
    for name, flags in MODELS.items():
        root = tmp_path_factory.mktemp(name)
        train_tiny(root / "ckpt", flags, iters=20)
        out[name] = root, export_to_hf(str(root / "ckpt"), str(root / "hf"))
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_export_matches_transformers(exported, name):
    root, hf_config = exported[name]
    assert hf_config["architectures"] == ["DeepseekV3ForCausalLM"] and hf_config["rope_interleave"] is True
    hf = transformers.AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32, local_files_only=True)
    hf.eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    if name == "v3":
        assert hf_config["first_k_dense_replace"] == 1 and hf_config["rope_parameters"]["rope_type"] == "yarn"
        # The multi-token-prediction module stays in megaflow's checkpoint; transformers has none.
        assert any(n.startswith("mtp.layers.0.") for n in CheckpointReader(str(root / "ckpt")).names("model"))
        assert hf_config["num_nextn_predict_layers"] == 0 and len(hf.model.layers) == 4
        assert type(hf.model.layers[0].mlp).__name__ == "DeepseekV3MLP"
        assert hf.model.layers[1].mlp.gate.e_score_correction_bias.abs().sum() > 0   # trained, exported
    cfg, model = load_inference_model(str(root / "ckpt"))
    for prompt in ([10, 11, 12, 13, 14], [201, 7, 64, 3, 150, 22, 99, 5]):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, model(ids)[..., :cfg.vocab_size], rtol=1e-4, atol=1e-4)
        ours = generate(model, prompt, 16)   # through the compressed-latent cache
        theirs = hf.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(prompt):].tolist()
        assert ours == theirs, (prompt, ours, theirs)


@pytest.mark.parametrize("name", list(MODELS))
def test_import_at_tp2_pp2_and_export_again_is_identical(exported, name, tmp_path):
    root, _ = exported[name]
    cfg = import_from_hf(str(root / "hf"), str(tmp_path / "ckpt"), tp=2, pp=2)
    assert hf_architecture(cfg) == "DeepseekV3ForCausalLM" and cfg.model.multi_latent_attention
    assert (cfg.model.rope_type, cfg.moe.num_experts) == (("yarn", 8) if name == "v3" else ("rope", None))
    again = parse_args(training_flags(cfg) + ["--seq-length", "32"], world_size=4)   # flags to continue it
    chosen = {"attention_dropout", "hidden_dropout", "init_method_std"}            # the user's to choose
    assert {k: v for k, v in vars(again.model).items() if k not in chosen} == \
        {k: v for k, v in vars(cfg.model).items() if k not in chosen}
    assert {k: v for k, v in vars(again.moe).items() if k != "moe_aux_loss_coeff"} == \
        {k: v for k, v in vars(cfg.moe).items() if k != "moe_aux_loss_coeff"}
    export_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf2"))
    first, second = load_file(root / "hf" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    names = " ".join(first)
    assert ("self_attn.q_a_proj.weight" in names) == (name == "v3")
    assert ("self_attn.q_proj.weight" in names) == (name == "dense")
    assert ("mlp.shared_experts.down_proj.weight" in names) == (name == "v3")
    written = json.loads((tmp_path / "hf2" / "config.json").read_text())
    original = json.loads((root / "hf" / "config.json").read_text())
    for key in ("model_type", "first_k_dense_replace", "rope_parameters", "n_group", "topk_group",
                "routed_scaling_factor", "q_lora_rank", "kv_lora_rank"):
        assert written[key] == original[key], key


def test_multi_token_prediction_layers_export_and_import_in_deepseeks_layout(exported, tmp_path):
    """--export-mtp writes the MTP module as DeepSeek's released weights hold it (decoder layer n, with
    enorm / hnorm / eh_proj / shared_head and copies of the embedding and head); transformers still loads
    the folder as before; importing keeps the module, weights equal, and exporting again is identical."""
    root, _ = exported["v3"]
    config = export_to_hf(str(root / "ckpt"), str(tmp_path / "hf"), keep_mtp=True)
    assert config["num_nextn_predict_layers"] == 1 and config["num_hidden_layers"] == 4
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    for name in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head", "embed_tokens",
                 "self_attn.q_a_proj", "mlp.gate", "mlp.shared_experts.down_proj"):
        assert f"model.layers.4.{name}.weight" in tensors, name
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32,
                                                           local_files_only=True)
    plain = transformers.AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32,
                                                              local_files_only=True)
    ids = torch.tensor([[10, 11, 12, 13, 14]])
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, plain(ids).logits)        # the extra layer changes nothing there
    cfg = import_from_hf(str(tmp_path / "hf"), str(tmp_path / "ckpt"), tp=2, pp=2)
    assert cfg.model.mtp_num_layers == 1 and "--mtp-num-layers" in training_flags(cfg)
    original, imported = CheckpointReader(str(root / "ckpt")), CheckpointReader(str(tmp_path / "ckpt"))
    mtp = [n for n in original.names("model") if n.startswith("mtp.layers.0.")]
    assert len(mtp) > 10 and set(mtp) <= set(imported.names("model"))
    for name in mtp:
        assert torch.equal(original.assemble("model/" + name), imported.assemble("model/" + name)), name
    export_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf2"), keep_mtp=True)
    again = load_file(tmp_path / "hf2" / "model.safetensors")
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("flags, reason", [
    (DEEPSEEK_V3 + ["--moe-router-score-function", "softmax"], "sigmoid"),
    (MLA + ROUTING + ["--moe-shared-expert-intermediate-size", "48"], "multiple of --moe-ffn-hidden-size"),
    (MLA + ROUTING + ["--moe-layer-freq", "[1,0,1,1]"], "follow its dense ones"),
    (MLA + ROUTING + ["--moe-router-topk", "2"], "best two scores"),
])
def test_models_deepseek_cannot_express_are_refused(flags, reason):
    cfg = parse_args(flags)
    with pytest.raises(ConversionError, match=reason):
        hf_architecture(cfg)
