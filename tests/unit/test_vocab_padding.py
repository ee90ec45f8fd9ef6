"""Vocabulary padding takes no part, in one process: the same model padded to 640 or 768 rows (what
TP=1 and TP=2 give a 513-id vocabulary) trains identically, padding rows stay exactly 0 under AdamW
with weight decay (and in Adam's moments), returned logits are -inf on padding, and --label-smoothing
is the smoothed cross entropy over the true vocabulary. The layouts themselves are compared in
tests/distributed/ (test_tensor_parallel.py, test_composition.py, test_checkpoint_layouts.py)."""
import pytest
import torch
import torch.nn.functional as F

from megaflow.config import config_from_kwargs, parse_args, set_vocab_size
from megaflow.layers import VocabParallelCrossEntropy
from megaflow.model import build_model, global_named_parameters
from megaflow.optim.optimizer import build_optimizer
from megaflow.training.step import train_step

VOCAB = 513                                   # NullTokenizer --vocab-size 512 + EOD
VOCAB_TENSORS = ("word_embeddings.weight", "output_layer.weight")


def tiny_cfg(style, divisible_by, **kw):
    args = dict(model_style=style, num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                hidden_dropout=0.0, attention_dropout=0.0, make_vocab_size_divisible_by=divisible_by,
                optimizer="adam", lr=1e-2, weight_decay=0.1, micro_batch_size=2, global_batch_size=4)
    args.update(kw)
    cfg = config_from_kwargs(**args)
    set_vocab_size(cfg, VOCAB)
    return cfg


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        tokens = torch.randint(0, VOCAB, (2, 17), generator=g)
        tokens[0, 3] = VOCAB - 1                                  # the last real id (EOD) occurs
        yield {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, 16),
               "position_ids": torch.arange(16).expand(2, 16)}


def train(style, divisible_by, steps=2, **kw):
    cfg = tiny_cfg(style, divisible_by, **kw)
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    data, losses, pad_grad = list(batches(2)), [], 0.0                 # the same batch: the loss must fall
    for _ in range(steps):
        losses.append(train_step(cfg, model, opt, None, iter(data), 2).loss)
        pad_grad = max([pad_grad] + [p.grad[VOCAB:].abs().max().item() for n, p in global_named_parameters(model)
                                     if n in VOCAB_TENSORS])
    weights = {n: p.detach().clone() for n, p in global_named_parameters(model)}
    moments = [t for pc, s in opt.piece_states() if pc.name in VOCAB_TENSORS for k, t in s.items() if t.ndim
               for t in [t.view(pc.param.shape)]]
    return cfg, model, losses, weights, pad_grad, moments


@pytest.mark.parametrize("style", ["gpt2", "llama"])                  # tied and untied output layer
def test_padding_changes_nothing_and_stays_zero(style):
    """SGD with weight decay: losses and real weights equal to fp32 round-off (Adam would turn the
    round-off in gradients that are exactly 0 in exact arithmetic, like GPT-2's key bias, into lr-sized
    steps: the next test runs Adam and compares what it can)."""
    cfg_a, _, losses_a, w_a, pad_grad_a, _ = train(style, 128, optimizer="sgd", lr=0.5)
    cfg_b, _, losses_b, w_b, pad_grad_b, _ = train(style, 256, optimizer="sgd", lr=0.5)
    assert (cfg_a.padded_vocab_size, cfg_b.padded_vocab_size) == (640, 768)
    assert losses_a[-1] < losses_a[0] - 0.05                            # it trained
    assert losses_b == pytest.approx(losses_a, rel=1e-6, abs=0)
    for name, w in w_a.items():
        real = w[:VOCAB] if name in VOCAB_TENSORS else w
        torch.testing.assert_close(w_b[name][:real.shape[0]], real, rtol=1e-5, atol=1e-6, msg=name)
    assert pad_grad_a == pad_grad_b == 0.0                               # exactly no gradient
    for w in (w_a, w_b):                                                 # weight decay moved nothing
        assert all(not w[n][VOCAB:].any() for n in VOCAB_TENSORS if n in w)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_padding_rows_and_adam_moments_stay_zero_under_adamw_weight_decay(style):
    losses = {}
    for divisible_by in (128, 256):
        _, _, losses[divisible_by], w, pad_grad, moments = train(style, divisible_by)
        assert pad_grad == 0.0 and all(not w[n][VOCAB:].any() for n in VOCAB_TENSORS if n in w)
        assert len(moments) == (2 if style == "gpt2" else 4)             # m and v of each vocab tensor
        assert all(not m[VOCAB:].any() and m[:VOCAB].any() for m in moments)
    assert losses[256] == pytest.approx(losses[128], rel=1e-6, abs=0)


def test_padding_values_do_not_reach_the_loss_or_the_logits():
    """Even non-zero padding rows (an old checkpoint, a foreign one) change neither the loss nor the
    real logits; returned logits are -inf on padding, so greedy decoding never picks it."""
    cfg = tiny_cfg("llama", 128)
    model = build_model(cfg).eval()
    batch = next(batches(1))
    with torch.no_grad():
        loss = model(batch["tokens"], labels_bs=batch["labels"])
        logits = model(batch["tokens"])
        model.output_layer.weight[VOCAB:] = 50.0                         # would win every softmax
        loss_junk = model(batch["tokens"], labels_bs=batch["labels"])
        logits_junk = model(batch["tokens"])
    assert logits.shape[-1] == 640 and torch.isneginf(logits[..., VOCAB:]).all()
    assert torch.isfinite(logits[..., :VOCAB]).all()
    torch.testing.assert_close(loss_junk, loss, rtol=0, atol=0)
    torch.testing.assert_close(logits_junk, logits, rtol=0, atol=0)
    assert (logits_junk.argmax(-1) < VOCAB).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_label_smoothing_flag_is_torchs_smoothed_loss_over_the_true_vocabulary(backend):
    cfg = parse_args(["--tokenizer-type", "NullTokenizer", "--vocab-size", "512", "--mock-data",
                      "--label-smoothing", "0.1", "--num-layers", "1", "--hidden-size", "32",
                      "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "2",
                      "--global-batch-size", "2", "--hidden-dropout", "0", "--attention-dropout", "0"])
    set_vocab_size(cfg, VOCAB)
    assert cfg.model.label_smoothing == 0.1 and cfg.padded_vocab_size == 640
    model = build_model(cfg)
    model.lm_loss.backend = backend                                      # the Triton interpreter on CPU
    batch = next(batches(1))
    loss = model(batch["tokens"], labels_bs=batch["labels"])
    with torch.no_grad():
        logits = model(batch["tokens"])[..., :VOCAB]
    want = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none",
                           label_smoothing=0.1).view(2, 16)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    loss.sum().backward()
    assert not model.word_embeddings.weight.grad[VOCAB:].any()          # tied GPT-2: output = embedding


def test_label_smoothing_out_of_range_is_refused():
    with pytest.raises(ValueError, match="--label-smoothing must be in"):
        VocabParallelCrossEntropy(VOCAB, label_smoothing=1.0)
