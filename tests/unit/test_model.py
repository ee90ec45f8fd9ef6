import pytest
import torch

from megaflow.config import config_from_kwargs, set_vocab_size
from megaflow.model import build_model, global_named_parameters


def tiny_cfg(style, **kw):
    args = dict(model_style=style, num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=16,
                vocab_size=500, hidden_dropout=0.0, attention_dropout=0.0)
    if style == "llama":
        args.update(group_query_attention=True, num_query_groups=2)
    args.update(kw)
    cfg = config_from_kwargs(**args)
    set_vocab_size(cfg, cfg.data.vocab_size)
    return cfg


def test_gpt2_style_shapes_and_tied_embeddings():
    model = build_model(tiny_cfg("gpt2"))
    names = dict(global_named_parameters(model))
    assert names["word_embeddings.weight"].shape == (512, 64)       # 500 padded to 128·TP
    assert names["position_embeddings.weight"].shape == (16, 64)
    assert names["layers.0.self_attention.linear_qkv.weight"].shape == (3 * 64, 64)
    assert names["layers.0.self_attention.linear_qkv.bias"].shape == (3 * 64,)
    assert names["layers.1.mlp.linear_fc1.weight"].shape == (256, 64)
    assert "output_layer.weight" not in names                        # tied: logits use the embedding
    assert "layers.0.input_norm.bias" in names                       # LayerNorm
    ids = torch.randint(0, 500, (3, 16))
    assert model(ids).shape == (3, 16, 512)
    assert model(ids, labels_bs=ids).shape == (3, 16)


def test_llama_style_shapes_gqa_untied_no_bias():
    model = build_model(tiny_cfg("llama"))
    names = dict(global_named_parameters(model))
    head_dim = 16
    assert names["layers.0.self_attention.linear_qkv.weight"].shape == ((4 + 2 * 2) * head_dim, 64)
    assert names["layers.0.mlp.linear_fc1.weight"].shape == (2 * 128, 64)   # [gate; up], ffn 128
    assert names["output_layer.weight"].shape == (512, 64)
    assert not any(n.endswith(".bias") for n in names)
    assert "position_embeddings.weight" not in names                 # RoPE
    ids = torch.randint(0, 500, (2, 16))
    loss = model(ids, labels_bs=ids)
    assert loss.shape == (2, 16) and torch.isfinite(loss).all()


def test_megatron_init_std_and_scaled_output_projections():
    cfg = tiny_cfg("llama", hidden_size=256, num_attention_heads=4, num_layers=8, ffn_hidden_size=1024)
    names = dict(global_named_parameters(build_model(cfg)))
    assert names["layers.0.mlp.linear_fc1.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert names["layers.0.mlp.linear_fc2.weight"].std().item() == pytest.approx(0.02 / 4.0, rel=0.05)
    assert names["layers.3.input_norm.weight"].eq(1).all()


def test_same_seed_same_weights_whatever_the_stage_split():
    cfg = tiny_cfg("llama", num_layers=4)
    full = dict(global_named_parameters(build_model(cfg)))
    from megaflow.model import GPTModel, initialize_weights
    stage = GPTModel(cfg, pre_process=False, post_process=True, layer_numbers=[2, 3])
    initialize_weights(stage, cfg.training.seed)
    for name, p in global_named_parameters(stage):
        assert torch.equal(p, full[name]), name


def test_loss_is_near_log_vocab_at_init():
    model = build_model(tiny_cfg("gpt2"))
    ids, labels = torch.randint(0, 500, (4, 16)), torch.randint(0, 500, (4, 16))
    loss = model(ids, labels_bs=labels).mean().item()
    assert abs(loss - torch.log(torch.tensor(512.0)).item()) < 0.5
