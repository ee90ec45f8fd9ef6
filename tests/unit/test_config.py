import pytest

from megaflow.config import ConfigError, parse_args


def test_megatron_flags_and_llama_preset():
    cfg = parse_args(["--model-style", "llama", "--num-layers", "3", "--hidden-size", "256",
                      "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2",
                      "--seq-length", "64", "--lr", "3e-4", "--bf16"])
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_query_groups) == (3, 256, 2)
    assert (m.normalization, m.position_embedding_type, m.swiglu) == ("RMSNorm", "rope", True)
    assert m.add_bias_linear is False and m.untie_embeddings_and_output_weights is True
    assert m.ffn_hidden_size == 640 and m.max_position_embeddings == 64
    assert cfg.training.lr == 3e-4 and cfg.training.bf16


def test_gpt2_defaults_match_megatron_and_explicit_flags_override_the_style():
    cfg = parse_args([])
    assert (cfg.model.normalization, cfg.model.position_embedding_type) == ("LayerNorm", "learned_absolute")
    assert cfg.model.add_bias_linear and not cfg.model.untie_embeddings_and_output_weights
    cfg = parse_args(["--model-style", "llama", "--normalization", "LayerNorm"])
    assert cfg.model.normalization == "LayerNorm" and cfg.model.swiglu


def test_yaml_then_command_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  num_layers: 5\n  disable-bias-linear: true\nlr: 0.01\nseq-length: 32\n")
    cfg = parse_args(["--config", str(path), "--lr", "0.02"])
    assert cfg.model.num_layers == 5 and cfg.model.add_bias_linear is False
    assert cfg.training.lr == 0.02 and cfg.data.seq_length == 32


@pytest.mark.parametrize("argv, flag, world_size", [
    (["--num-attention-heads", "3"], "--num-attention-heads", 1),
    (["--group-query-attention", "--num-query-groups", "3"], "--num-query-groups", 1),
    (["--micro-batch-size", "4", "--global-batch-size", "6"], "--global-batch-size", 1),
    (["--seq-length", "256", "--max-position-embeddings", "128"], "--max-position-embeddings", 1),
    (["--bf16", "--fp16"], "--fp16", 1),
    (["--tensor-model-parallel-size", "3"], "--tensor-model-parallel-size", 6),
    (["--tensor-model-parallel-size", "2"], "--tensor-model-parallel-size", 3),
])
def test_invalid_combinations_name_the_flag(argv, flag, world_size):
    with pytest.raises(ConfigError, match=flag):
        parse_args(argv, world_size=world_size)


def test_global_batch_must_be_multiple_of_micro_times_dp():
    with pytest.raises(ConfigError, match="data-parallel size"):
        parse_args(["--micro-batch-size", "2", "--global-batch-size", "6"], world_size=2)
    cfg = parse_args(["--micro-batch-size", "2", "--global-batch-size", "8"], world_size=2)
    assert cfg.data_parallel_size == 2


def test_unknown_flag_and_bad_yaml_key(tmp_path):
    with pytest.raises(ConfigError, match="--no-such-flag"):
        parse_args(["--no-such-flag", "1"])
    path = tmp_path / "bad.yaml"
    path.write_text("num_layers: two\n")
    with pytest.raises(ConfigError, match="--num-layers expects int"):
        parse_args(["--config", str(path)])
    path.write_text("colour: blue\n")
    with pytest.raises(ConfigError, match="unknown setting 'colour'"):
        parse_args(["--config", str(path)])


def test_bad_type_on_command_line_is_an_error():
    with pytest.raises(ConfigError):
        parse_args(["--num-layers", "two"])


def test_config_round_trips_through_json():
    import json

    from megaflow.config import Config
    cfg = parse_args(["--model-style", "llama", "--num-layers", "3"])
    again = Config.from_dict(json.loads(cfg.to_json()))
    assert again == cfg


@pytest.mark.parametrize("strategy, sharded, stage", [
    ("no_shard", False, 1), ("optim", True, 1), ("optim_grads", True, 2), ("optim_grads_params", True, 3)])
def test_megatron_sharding_strategy_is_the_zero_stage(strategy, sharded, stage):
    p = parse_args(["--data-parallel-sharding-strategy", strategy], world_size=2).parallel
    assert (p.use_distributed_optimizer, p.zero_stage) == (sharded, stage)
    again = parse_args(["--use-distributed-optimizer", "--zero-stage", str(stage)], world_size=2).parallel
    assert again.zero_stage == stage and again.use_distributed_optimizer


@pytest.mark.parametrize("argv, flag", [
    (["--zero-stage", "3"], "--use-distributed-optimizer"),
    (["--data-parallel-sharding-strategy", "optim_grads", "--zero-stage", "3"], "--data-parallel-sharding-strategy"),
    (["--data-parallel-sharding-strategy", "no_shard", "--use-distributed-optimizer"], "no_shard"),
    (["--use-distributed-optimizer", "--zero-stage", "2", "--no-reshard-after-forward"], "--no-reshard-after-forward"),
])
def test_contradictory_zero_flags_name_the_flag(argv, flag):
    with pytest.raises(ConfigError, match=flag):
        parse_args(argv, world_size=2)


@pytest.mark.parametrize("argv, flag", [
    (["--model-style", "llama", "--multi-latent-attention", "--group-query-attention", "--num-query-groups", "2"],
     "--group-query-attention"),
    (["--model-style", "gpt2", "--multi-latent-attention"], "--position-embedding-type rope"),
    (["--model-style", "llama", "--multi-latent-attention", "--qk-pos-emb-head-dim", "7"], "--qk-pos-emb-head-dim"),
    (["--model-style", "gpt2", "--rope-type", "yarn"], "--rope-type yarn"),
    (["--model-style", "llama", "--rope-type", "yarn", "--rotary-scaling-factor", "0.5"], "--rotary-scaling-factor"),
    (["--model-style", "llama", "--mtp-num-layers", "0"], "--mtp-num-layers"),
    (["--model-style", "llama", "--mtp-num-layers", "1", "--context-parallel-size", "2"], "--context-parallel-size"),
])
def test_model_family_flags_that_cannot_work_name_the_flag(argv, flag):
    """Multi-latent attention, YaRN and multi-token prediction (issue 19): refused before anything runs."""
    with pytest.raises(ConfigError, match=flag):
        parse_args(argv, world_size=2)
