"""Checkpoint format in one process: only safetensors and JSON, failures that name the file and tensor,
--async-save publishing only complete checkpoints, retention, the data position across DP sizes."""
import json
import os
import threading

import pytest
import torch

from megaflow.checkpoint import CheckpointError, CheckpointWriter, load_checkpoint, save_checkpoint
from megaflow.checkpoint import format as fmt
from megaflow.checkpoint import staging as staging_mod
from megaflow.config import config_from_kwargs, set_vocab_size
from megaflow.data.sampler import MegatronPretrainingSampler
from megaflow.model import build_model, global_named_parameters
from megaflow.optim.optimizer import build_optimizer
from megaflow.parallel import state

RANK_FILE = "mp_rank_00_000_dp000.safetensors"


def build(**kw):
    state.destroy()
    args = dict(model_style="llama", num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                mock_data=True, tokenizer_type="NullTokenizer", vocab_size=99, make_vocab_size_divisible_by=8,
                hidden_dropout=0.0, attention_dropout=0.0, ddp_bucket_size=3000)
    args.update(kw)
    cfg = config_from_kwargs(**args)
    set_vocab_size(cfg, 100)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    for p in model.parameters():                 # one real step: Adam's state exists and is not zero
        p.main_grad.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    optimizer.step()
    return cfg, model, optimizer


def save(root, it=1, built=None):
    cfg, model, optimizer = built or build()
    return save_checkpoint(str(root), it, model, optimizer, None, None, 8 * it, cfg.to_json())


def test_roundtrip_and_only_safetensors_and_json_are_read(tmp_path, monkeypatch):
    cfg, model, optimizer = built = build()
    path = save(tmp_path, 3, built)
    assert sorted(os.listdir(path)) == ["config.json", "metadata.json", RANK_FILE]
    assert (tmp_path / fmt.TRACKER).read_text() == "3"
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load (pickle) used"))
    _, model2, optimizer2 = build(seed=7)        # other initial weights, fresh optimizer
    info = load_checkpoint(str(tmp_path), model2, optimizer2)
    assert info["iteration"] == 3 and info["consumed_samples"] == 24 and info["rng_note"] is None
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    for pa, pb in zip(optimizer.pieces, optimizer2.pieces):
        sa, sb = optimizer.optimizer.state[pa.main], optimizer2.optimizer.state[pb.main]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_missing_truncated_and_foreign_files_are_named(tmp_path):
    built = build()
    for it in (1, 2, 3):
        save(tmp_path, it, built)
    _, model, optimizer = build()
    os.remove(tmp_path / "iter_0000001" / RANK_FILE)
    with pytest.raises(CheckpointError, match=f"missing checkpoint file .*iter_0000001/{RANK_FILE} "
                                              r"\(needed for model/word_embeddings.weight\)"):
        load_checkpoint(str(tmp_path), model, optimizer, iteration=1)
    rank_file = tmp_path / "iter_0000002" / RANK_FILE
    rank_file.write_bytes(rank_file.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"iter_0000002/{RANK_FILE}: truncated or modified .*"
                                              r"\(needed for model/word_embeddings.weight\)"):
        load_checkpoint(str(tmp_path), model, optimizer, iteration=2)
    meta = tmp_path / "iter_0000003" / "metadata.json"
    meta.write_text(meta.read_text()[:200])
    with pytest.raises(CheckpointError, match="cannot read checkpoint file .*iter_0000003/metadata.json"):
        load_checkpoint(str(tmp_path), model, optimizer)
    (tmp_path / fmt.TRACKER).write_text("4")
    with pytest.raises(CheckpointError, match="missing checkpoint folder .*iter_0000004"):
        load_checkpoint(str(tmp_path), model, optimizer)


def test_a_piece_whose_data_disagrees_with_the_index_is_named(tmp_path):
    path = save(tmp_path)
    meta = json.loads(open(os.path.join(path, "metadata.json")).read())
    entry = meta["tensors"]["model/layers.1.mlp.linear_fc2.weight"]
    entry["pieces"][0]["range"][1] -= 4                   # claims fewer elements than the file holds
    with open(os.path.join(path, "metadata.json"), "w") as fh:
        json.dump(meta, fh)
    _, model, optimizer = build()
    with pytest.raises(CheckpointError, match=f"{RANK_FILE}: model/layers.1.mlp.linear_fc2.weight holds"):
        load_checkpoint(str(tmp_path), model, optimizer)


def test_another_model_fails_naming_tensor_and_file(tmp_path):
    save(tmp_path)
    _, model, optimizer = build(ffn_hidden_size=96)      # saved with 64
    with pytest.raises(CheckpointError, match=rf"iter_0000001/{RANK_FILE}: tensor model/layers.0.mlp.linear_fc1.weight "
                                              r"has shape \[128, 32\], the model expects \[192, 32\]"):
        load_checkpoint(str(tmp_path), model, optimizer)
    _, model, optimizer = build(num_layers=3)
    with pytest.raises(CheckpointError, match=r"missing in the checkpoint: \['layers.2.input_norm.weight'"):
        load_checkpoint(str(tmp_path), model, optimizer)
    _, model, optimizer = build(optimizer="sgd")
    with pytest.raises(CheckpointError, match="optimizer state of AdamW, this run uses SGD"):
        load_checkpoint(str(tmp_path), model, optimizer)
    load_checkpoint(str(tmp_path), model, optimizer, load_optim=False)  # weights only: fine


def test_fp32_weights_and_main_params_survive_a_precision_change(tmp_path):
    """fp32 -> bf16 params: the fp32 main copies take the checkpoint's fp32 values (also without optimizer
    state, as with --finetune); bf16 params + fp32 main -> fp32: the weights are the main copies."""
    _, model, _ = built = build()
    save(tmp_path / "fp32", 1, built)
    saved = {n: p.detach().clone() for n, p in global_named_parameters(model)}
    _, low, low_opt = build(seed=7, bf16=True, low_precision_params=True)
    load_checkpoint(str(tmp_path / "fp32"), low, low_opt, load_optim=False)
    for pc in low_opt.pieces:
        assert torch.equal(pc.main, saved[pc.name].reshape(-1)[pc.lo:pc.hi]), pc.name
    assert all(torch.equal(p, saved[n].bfloat16()) for n, p in global_named_parameters(low))
    low_opt.step()                                      # moves the main copies: bf16 would lose them
    save_checkpoint(str(tmp_path / "bf16"), 2, low, low_opt, None, None, 16, "{}")
    mains = {pc.name: pc.main.clone() for pc in low_opt.pieces}
    _, model2, optimizer2 = build(seed=9)
    load_checkpoint(str(tmp_path / "bf16"), model2, optimizer2)
    assert all(torch.equal(p.reshape(-1), mains[n]) for n, p in global_named_parameters(model2))


def test_async_save_publishes_only_after_the_write_and_copies_synchronously(tmp_path, monkeypatch):
    cfg, model, optimizer = built = build()
    save(tmp_path, 1, built)
    gate, write = threading.Event(), fmt.write_rank_file
    monkeypatch.setattr(fmt, "write_rank_file", lambda *a: gate.wait(30) and write(*a))
    writer = CheckpointWriter(str(tmp_path), async_save=True)
    expected = [p.detach().clone() for p in model.parameters()]
    assert writer.save(2, model, optimizer, None, None, 16, cfg.to_json()) is None
    with torch.no_grad():                                  # training goes on while the thread writes
        for p in model.parameters():
            p.add_(1.0)
    assert writer.poll() is None and (tmp_path / fmt.TRACKER).read_text() == "1"
    assert os.path.isdir(tmp_path / "iter_0000002.tmp") and not os.path.exists(tmp_path / "iter_0000002")
    gate.set()
    assert writer.wait() == str(tmp_path / "iter_0000002") and (tmp_path / fmt.TRACKER).read_text() == "2"
    _, model2, optimizer2 = build(seed=7)
    load_checkpoint(str(tmp_path), model2, optimizer2)
    assert all(torch.equal(a, b) for a, b in zip(expected, model2.parameters()))


def test_deferred_host_copies_are_made_before_the_next_update(tmp_path, monkeypatch):
    """The trainer's --async-save: save() returns before the CPU copies are made (the writer thread makes
    them); prepare_update(), which train_step calls before changing any state, waits for them, so the
    checkpoint holds the state of the save, not of the update after it."""
    cfg, model, optimizer = build()
    gate, copy = threading.Event(), staging_mod.StagingFence.wait
    monkeypatch.setattr(staging_mod.StagingFence, "wait", lambda self: gate.wait(30) and copy(self))
    writer = CheckpointWriter(str(tmp_path), async_save=True, defer_host_copies=True)
    optimizer.before_update.append(writer.staging.wait_staged)
    expected = [p.detach().clone() for p in model.parameters()]
    assert writer.save(2, model, optimizer, None, None, 16, cfg.to_json()) is None
    assert writer.staging.buffers and writer.staging.copies_pending()     # copies not made yet
    threading.Timer(0.2, gate.set).start()
    optimizer.prepare_update()                             # blocks until the writer has copied
    assert writer.staging.waited > 0.1
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert writer.wait() == str(tmp_path / "iter_0000002")
    _, model2, optimizer2 = build(seed=7)
    load_checkpoint(str(tmp_path), model2, optimizer2)
    assert all(torch.equal(a, b) for a, b in zip(expected, model2.parameters()))


def test_a_failed_async_write_raises_and_keeps_the_tracker(tmp_path, monkeypatch):
    cfg, model, optimizer = built = build()
    save(tmp_path, 1, built)

    def broken(path, *_):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(fmt, "write_rank_file", broken)
    writer = CheckpointWriter(str(tmp_path), async_save=True)
    writer.save(2, model, optimizer, None, None, 16, cfg.to_json())
    with pytest.raises(CheckpointError, match=f"iteration 2 failed, the tracker is unchanged: .*{RANK_FILE}.*No space"):
        writer.wait()
    assert (tmp_path / fmt.TRACKER).read_text() == "1" and not os.path.exists(tmp_path / "iter_0000002")


def test_retention_keeps_the_latest_and_multiples_of_the_interval(tmp_path):
    cfg, model, optimizer = build()
    os.makedirs(tmp_path / "iter_0000100")               # another run's later checkpoint: never touched
    writer = CheckpointWriter(str(tmp_path), keep_last=2, retain_interval=3)
    for it in range(1, 8):
        writer.save(it, model, optimizer, None, None, 8 * it, cfg.to_json())
    assert fmt.saved_iterations(str(tmp_path)) == [3, 6, 7, 100]
    writer = CheckpointWriter(str(tmp_path), retain_interval=4)   # Megatron's --save-retain-interval alone
    writer.save(8, model, optimizer, None, None, 64, cfg.to_json())
    assert fmt.saved_iterations(str(tmp_path)) == [8, 100]
    assert not [n for n in os.listdir(tmp_path) if n.endswith((".tmp", ".trash"))]


def test_vocabulary_rows_follow_the_padding():
    full = torch.arange(12.0).view(6, 2)                  # 4 real rows + 2 padding rows
    assert torch.equal(fmt.fit_vocab_rows(full, 6, 4, "k"), full)
    grown = fmt.fit_vocab_rows(full, 8, 4, "k")
    assert torch.equal(grown[:6], full) and not grown[6:].any()
    assert torch.equal(fmt.fit_vocab_rows(grown, 6, 4, "k"), full)   # round trip is exact
    with pytest.raises(CheckpointError, match="k: 6 rows in the checkpoint, the model has 3"):
        fmt.fit_vocab_rows(full, 3, 4, "k")


@pytest.mark.parametrize("dp_after", [1, 2, 4])
def test_consumed_samples_carry_across_data_parallel_sizes(dp_after):
    """The sampler slices each global batch by DP rank: resumed at another DP size with the same global
    batch (8 = micro × DP × micro-batches), every step sees the samples the DP=2 run would have seen."""
    def step_samples(dp, consumed, steps):
        mbs = 8 // dp // 2                                # 2 micro-batches per step
        iters = [iter(MegatronPretrainingSampler(64, consumed, mbs, r, dp)) for r in range(dp)]
        return [sorted(i for it in iters for _ in range(2) for i in next(it)) for _ in range(steps)]
    assert step_samples(2, 0, 5)[2:] == step_samples(dp_after, 16, 3)
