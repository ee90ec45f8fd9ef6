"""HF mapping, full-state reader/writer and HF folders, on small random models (no training).

Weights are drawn with a large init std so that logits are far from uniform: a wrong mapping (a
transposed or swapped block, a missing RoPE permutation, an off-by-one vocabulary) shows up as a
large logits error, not as noise under the tolerance."""
import json
import os

import pytest
import torch
from safetensors import safe_open

from megaflow.checkpoint.convert import export_to_hf, import_from_hf, training_flags
from megaflow.checkpoint.full_state import load_full_state_dict, save_full_state_dict
from megaflow.checkpoint.hf import ConversionError, from_hf_config, to_hf_state_dict
from megaflow.checkpoint.hf_folder import SAFE_INDEX, load_hf_weights
from megaflow.config import ConfigError, config_from_kwargs, parse_args, set_vocab_size
from megaflow.model import build_model, global_named_parameters

import transformers  # a dev dependency: a missing one must fail, not skip

VOCAB = 300  # NullTokenizer --vocab-size 299 + EOD; padded to 384 (TP=1) or 512 (TP=2)

STYLES = {
    "llama_gqa": dict(model_style="llama", group_query_attention=True, num_query_groups=2),
    "llama_tied_bias_headdim": dict(model_style="llama", untie_embeddings_and_output_weights=False,
                                    add_bias_linear=True, kv_channels=32),
    "gpt2": dict(model_style="gpt2"),
    "gpt2_untied": dict(model_style="gpt2", untie_embeddings_and_output_weights=True),
}


def make(style, **kw):
    args = dict(num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=32, max_position_embeddings=64,
                mock_data=True, tokenizer_type="NullTokenizer", vocab_size=VOCAB - 1, init_method_std=0.15,
                hidden_dropout=0.0, attention_dropout=0.0)
    args.update(STYLES[style])
    args.update(kw)
    cfg = config_from_kwargs(**args)
    set_vocab_size(cfg, VOCAB)
    model = build_model(cfg).eval()
    with torch.no_grad():  # norms and biases start at 1/0: perturb them so their mapping is tested too
        for name, p in global_named_parameters(model):
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    return cfg, model, {n: p.detach().clone() for n, p in global_named_parameters(model)}


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("tp,pp", [(2, 2), (1, 2), (2, 1)])
def test_full_state_roundtrip_any_layout(tmp_path, tp, pp):
    for style in ("llama_gqa", "gpt2"):
        cfg, _, sd = make(style)
        root = tmp_path / style
        save_full_state_dict(cfg, sd, str(root), tp=tp, pp=pp, iteration=7)
        assert (root / "latest_checkpointed_iteration.txt").read_text() == "7"
        files = sorted(os.listdir(root / "iter_0000007"))
        assert files == ["config.json", "metadata.json"] + sorted(
            f"mp_rank_{t:02d}_{p:03d}_dp000.safetensors" for t in range(tp) for p in range(pp))
        # Rank files hold TP shards under global names: the last stage holds the last layers.
        with safe_open(root / "iter_0000007" / files[-1], "pt") as last:
            qkv = f"model/layers.{4 - 4 // pp}.self_attention.linear_qkv.weight"
            assert last.get_tensor(qkv).shape[0] == sd["layers.0.self_attention.linear_qkv.weight"].shape[0] // tp
            layers = {k.split(".")[1] for k in last.keys() if k.startswith("model/layers.")}
            assert layers == {str(i) for i in range(4 - 4 // pp, 4)}
            if style == "gpt2":  # tied: the embedding is stored once, by the first stage
                assert not any("output_layer" in k or (pp > 1 and "word_embeddings" in k) for k in last.keys())
        cfg2, sd2 = load_full_state_dict(str(root))
        assert cfg2.parallel.tensor_model_parallel_size == tp and cfg2.padded_vocab_size == (512 if tp == 2 else 384)
        assert set(sd2) == set(sd)
        for name, t in sd.items():
            if name in ("word_embeddings.weight", "output_layer.weight"):
                assert torch.equal(sd2[name][:VOCAB], t[:VOCAB]) and not sd2[name][VOCAB:].any(), name
            else:
                assert torch.equal(sd2[name], t), name


@pytest.mark.parametrize("style", list(STYLES))
def test_exported_logits_match_transformers(tmp_path, style):
    cfg, model, sd = make(style)
    save_full_state_dict(cfg, sd, str(tmp_path / "ckpt"), tp=2, pp=2)  # exported through the reader
    export_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM" if "llama" in style else "GPT2LMHeadModel"]
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as fh:
        names = set(fh.keys())
        embed = fh.get_tensor("model.embed_tokens.weight" if "llama" in style else "transformer.wte.weight")
    assert embed.shape[0] == VOCAB == config["vocab_size"]  # no vocabulary padding
    assert ("lm_head.weight" in names) == (not config["tie_word_embeddings"]) \
        == cfg.model.untie_embeddings_and_output_weights
    hf = hf_model(tmp_path / "hf")
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids)[..., :VOCAB]
        theirs = hf(ids).logits
    assert ours.abs().max() > 1.0  # far from uniform: the comparison means something
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    # The padding (84 rows here) takes no part: -inf logits, and the loss is the unpadded HF model's.
    labels = ids.roll(-1, dims=1)
    with torch.no_grad():
        assert torch.isneginf(model(ids)[..., VOCAB:]).all()
        our_loss = model(ids, labels_bs=labels)
    hf_loss = torch.nn.functional.cross_entropy(theirs.flatten(0, 1), labels.flatten(), reduction="none")
    torch.testing.assert_close(our_loss, hf_loss.view(labels.shape), rtol=1e-5, atol=1e-5)


def _random_hf_folder(path, style):
    """A folder as transformers itself writes it, with random weights."""
    torch.manual_seed(0)
    if style == "llama":
        config = transformers.LlamaConfig(vocab_size=250, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          rope_theta=5000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(vocab_size=250, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                         bos_token_id=249, eos_token_id=249)
        model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(path)
    return model.eval()


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_hf_to_megaflow_to_hf_is_identical(tmp_path, style):
    original = _random_hf_folder(tmp_path / "hf", style)
    cfg = import_from_hf(str(tmp_path / "hf"), str(tmp_path / "ckpt"), tp=2, pp=2)
    assert cfg.model.num_query_groups == (2 if style == "llama" else 4)
    export_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "back"))
    before, after = load_hf_weights(str(tmp_path / "hf")), load_hf_weights(str(tmp_path / "back"))
    before = {k: v for k, v in before.items() if not k.endswith(".attn.bias")}  # GPT-2's mask buffer, if any
    assert set(after) == set(before)
    for name, t in before.items():
        assert torch.equal(after[name], t), name
    a = json.loads((tmp_path / "hf" / "config.json").read_text())
    b = json.loads((tmp_path / "back" / "config.json").read_text())
    keys = ["vocab_size", "tie_word_embeddings", "architectures"] + (
        ["hidden_size", "intermediate_size", "num_key_value_heads", "rms_norm_eps", "rope_parameters"]
        if style == "llama" else ["n_embd", "n_layer", "n_head", "n_positions", "layer_norm_epsilon"])
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    ids = torch.randint(0, 250, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tmp_path / "back")(ids).logits, original(ids).logits, rtol=0, atol=0)


def test_sharded_bf16_export_with_index(tmp_path):
    cfg, _, sd = make("llama_gqa")
    save_full_state_dict(cfg, sd, str(tmp_path / "ckpt"))
    export_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"), dtype="bf16", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    weights = load_hf_weights(str(tmp_path / "hf"))
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in weights.values())
    expected = to_hf_state_dict(cfg, sd, torch.bfloat16)
    assert all(torch.equal(weights[k], v) for k, v in expected.items())
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")  # loads the shards
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("max_size", ["40KB", 30_000, "1MB"])
def test_shards_and_index_are_the_ones_transformers_writes(tmp_path, max_size):
    """huggingface_hub's splitter with its units: the files, their tensors and the index json are those of
    save_pretrained for the same state dict and limit (and one model.safetensors when it fits)."""
    from megaflow.checkpoint.hf_folder import save_safetensors
    cfg, _, sd = make("llama_gqa", untie_embeddings_and_output_weights=True)
    save_full_state_dict(cfg, sd, str(tmp_path / "ckpt"))
    export_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "exported"), max_shard_bytes=10 ** 9)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    hf_sd = model.state_dict()
    model.save_pretrained(tmp_path / "theirs", state_dict=hf_sd, max_shard_size=max_size)
    os.makedirs(tmp_path / "ours")
    names = save_safetensors(hf_sd, str(tmp_path / "ours"), max_size)
    theirs = sorted(f for f in os.listdir(tmp_path / "theirs") if f.startswith("model"))
    assert sorted(names + ([SAFE_INDEX] if len(names) > 1 else [])) == theirs
    assert (len(names) > 2) == (max_size != "1MB")
    if len(names) > 1:
        ours_index = (tmp_path / "ours" / SAFE_INDEX).read_text()
        assert ours_index == (tmp_path / "theirs" / SAFE_INDEX).read_text()  # the very text
    for f in names:
        with safe_open(str(tmp_path / "ours" / f), "pt") as a, safe_open(str(tmp_path / "theirs" / f), "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys())
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_default_shard_size_is_transformers_default():
    import inspect
    from megaflow.checkpoint.hf_folder import DEFAULT_MAX_SHARD_BYTES, DEFAULT_MAX_SHARD_SIZE, parse_size
    default = inspect.signature(transformers.PreTrainedModel.save_pretrained).parameters["max_shard_size"].default
    assert DEFAULT_MAX_SHARD_SIZE == default and parse_size(default) == DEFAULT_MAX_SHARD_BYTES == 50 * 10 ** 9
    assert parse_size("40KB") == 40_000 and parse_size("123") == 123
    with pytest.raises(ValueError, match="Supported units"):
        parse_size("5 parsecs")


def test_generation_config_and_tokenizer_for_null_tokenizer(tmp_path):
    cfg, _, sd = make("gpt2")
    save_full_state_dict(cfg, sd, str(tmp_path / "ckpt"))
    export_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == VOCAB - 1  # NullTokenizer's EOD
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok("12 0 298").input_ids == [12, 0, 298] and tok.eos_token_id == VOCAB - 1
    assert tok.decode([5, 7]) == "5 7" and len(tok) == VOCAB
    chat = tok.apply_chat_template([{"role": "user", "content": "3 4"}], tokenize=False, add_generation_prompt=True)
    assert tok(chat).input_ids == [3, 4]


def test_huggingface_tokenizer_files_are_exported(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = ["the quick brown fox jumps over the lazy dog", "megaflow trains tiny models on cpu"] * 50
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "</s>"]))
    os.makedirs(tmp_path / "tok")
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    from megaflow.data.tokenizers import build_tokenizer
    cfg, _, sd = make("llama_gqa", tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "tok"))
    ours = build_tokenizer(cfg.data)
    set_vocab_size(cfg, ours.vocab_size)
    sd = {k: (v[:ours.vocab_size] if k in ("word_embeddings.weight", "output_layer.weight") else v)
          for k, v in sd.items()}
    from megaflow.checkpoint.full_state import repad_vocab
    cfg, sd = repad_vocab(cfg, sd, 1)
    save_full_state_dict(cfg, sd, str(tmp_path / "ckpt"))
    export_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "the lazy fox trains models"
    assert theirs(text).input_ids == ours.tokenize(text)
    assert theirs.eos_token == "</s>" and theirs.eos_token_id == ours.eod
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == ours.vocab_size
    assert theirs.chat_template


def test_sentencepiece_tokenizer_is_exported(tmp_path):
    import sentencepiece as spm
    corpus = ["the quick brown fox jumps over the lazy dog", "megaflow trains tiny models on cpu"] * 100
    (tmp_path / "corpus.txt").write_text("\n".join(corpus))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=50, model_type="bpe", minloglevel=2)
    from megaflow.checkpoint.hf_tokenizer import export_tokenizer
    from megaflow.data.tokenizers import SentencePieceTokenizer
    cfg, _, _ = make("llama_gqa", tokenizer_type="SentencePieceTokenizer", tokenizer_model=str(tmp_path / "sp.model"))
    os.makedirs(tmp_path / "hf")
    ids = export_tokenizer(cfg.data, str(tmp_path / "hf"), 64)
    ours, theirs = SentencePieceTokenizer(str(tmp_path / "sp.model")), \
        transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in ("the lazy fox trains models", " jumps over", "dog"):  # no BOS added, as megaflow encodes
        assert theirs(text).input_ids == ours.tokenize(text)
    assert ids["eos_token_id"] == ours.eod == theirs.eos_token_id


def test_unsupported_models_fail_clearly(tmp_path):
    cfg, _, sd = make("llama_gqa")  # 2 query groups cannot be split over 4 TP ranks
    with pytest.raises(ConfigError, match="--num-query-groups"):
        save_full_state_dict(cfg, sd, str(tmp_path), tp=4)
    with pytest.raises(ConfigError, match="--pipeline-model-parallel-size"):  # 4 layers over 3 stages
        save_full_state_dict(cfg, sd, str(tmp_path), pp=3)
    assert os.listdir(tmp_path) == []  # nothing half-written
    cfg, _, _ = make("gpt2", add_bias_linear=False)
    with pytest.raises(ConversionError, match="disable-bias-linear"):
        to_hf_state_dict(cfg, {})
    with pytest.raises(ConversionError, match="RoPE scaling 'llama3'"):
        from_hf_config({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
                        "num_hidden_layers": 2, "intermediate_size": 96, "vocab_size": 100,
                        "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ConversionError, match="supported: LlamaForCausalLM, .*Qwen3ForCausalLM.* and GPT2LMHeadModel"):
        from_hf_config({"architectures": ["MistralForCausalLM"], "model_type": "mistral"})


ARCHITECTURE = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "kv_channels",
                "num_query_groups", "normalization", "norm_epsilon", "swiglu", "position_embedding_type",
                "rotary_base", "max_position_embeddings", "untie_embeddings_and_output_weights", "add_bias_linear",
                "make_vocab_size_divisible_by")


@pytest.mark.parametrize("style", list(STYLES))
def test_training_flags_rebuild_the_same_model(style):
    """The flags convert_from_hf prints rebuild the architecture (dropout, init: the user's choice)."""
    cfg, _, _ = make(style)
    again = parse_args(training_flags(cfg) + ["--seq-length", "32"])
    assert {f: getattr(again.model, f) for f in ARCHITECTURE} == {f: getattr(cfg.model, f) for f in ARCHITECTURE}
    assert (again.data.tokenizer_type, again.data.vocab_size) == ("NullTokenizer", VOCAB - 1)

