"""The process test_checkpoint_crash.py kills: a one-process model and optimizer saved in a loop, every
value of iteration N equal to N (parameters, Adam moments: 2N for exp_avg_sq), so a loaded checkpoint
shows whether it is whole and what it claims to be."""
import torch

from megaflow.checkpoint import CheckpointWriter, latest_iteration, load_checkpoint
from megaflow.config import config_from_kwargs, set_vocab_size
from megaflow.model import build_model
from megaflow.optim.optimizer import build_optimizer
from megaflow.parallel import state

# Imported once by the forkserver: warm up what the first optimizer would import lazily (~1 s), so each
# forked child is ready within a fraction of a second. One thread: forked children must not inherit a pool.
torch.set_num_threads(1)
torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).step()


def build():
    state.destroy()
    cfg = config_from_kwargs(model_style="llama", num_layers=2, hidden_size=256, num_attention_heads=4,
                             seq_length=16, mock_data=True, tokenizer_type="NullTokenizer", vocab_size=4095,
                             hidden_dropout=0.0, attention_dropout=0.0, ddp_bucket_size=200_000)
    set_vocab_size(cfg, 4096)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    optimizer.step()  # zero gradients: creates Adam's state
    return cfg, model, optimizer


@torch.no_grad()
def set_values(model, optimizer, value: float) -> None:
    for p in model.parameters():
        p.fill_(value)
    for s in optimizer.optimizer.state.values():
        s["exp_avg"].fill_(value)
        s["exp_avg_sq"].fill_(2 * value)


def saver_loop(root: str, async_save: bool, ready) -> None:
    """Save iterations latest+1, latest+2, ... until killed (keeping the 2 latest); `ready` is set once
    the model is built."""
    cfg, model, optimizer = build()
    writer = CheckpointWriter(root, async_save=async_save, keep_last=2)
    it = (latest_iteration(root) or 0) + 1
    ready.set()
    while True:
        set_values(model, optimizer, it)
        writer.save(it, model, optimizer, None, None, 8 * it, cfg.to_json())
        it += 1


def check(root: str, built) -> int | None:
    """The iteration the tracker names, after loading it whole and checking every value; None if none."""
    it = latest_iteration(root)
    if it is None:
        return None
    _cfg, model, optimizer = built
    set_values(model, optimizer, -1.0)
    info = load_checkpoint(root, model, optimizer)
    assert info["iteration"] == it and info["consumed_samples"] == 8 * it
    assert all(bool((p == it).all()) for p in model.parameters())
    states = list(optimizer.optimizer.state.values())
    assert states and all(bool((s["exp_avg"] == it).all() and (s["exp_avg_sq"] == 2 * it).all()) for s in states)
    return it
