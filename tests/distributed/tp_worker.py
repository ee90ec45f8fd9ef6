"""Worker for test_tensor_parallel.py: one torchrun launch (4 gloo ranks) runs every tensor-parallel
check at TP=2 (×DP=2) and TP=4, and rank 0 writes the measurements to <out_dir>/results.json.

The worker measures; the test decides (thresholds live in test_tensor_parallel.py). Every TP=1
reference runs in-process on a world-size-1 state, so nothing is copied between layouts: the same
--seed gives the same full weights at any TP (model/init.py).
"""
import contextlib
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megaflow.config import config_from_kwargs, pad_vocab_size, set_vocab_size
from megaflow.layers import vocab_parallel_cross_entropy
from megaflow.layers.sharding import shard, unshard
from megaflow.model import build_model, global_named_parameters
from megaflow.optim.optimizer import build_optimizer
from megaflow.parallel import collectives, mappings, random, state
from megaflow.training.step import train_step

OUT = sys.argv[1]
VOCAB, SEQ, MBS, GBS, STEPS = 250, 16, 2, 4, 3
# The vocabulary pads differently at every TP (--make-vocab-size-divisible-by 56): 280 rows at TP=1,
# 336 at TP=2, 448 at TP=4 (whose last rank holds padding only). Padding must take no part.
DIVISIBLE = 56
PADDED = {tp: pad_vocab_size(VOCAB, DIVISIBLE, tp) for tp in (1, 2, 4)}
VOCAB_TENSORS = ("word_embeddings.weight", "output_layer.weight")  # their rows past VOCAB are padding
RESULTS = {}
torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------
# layouts

SINGLE = state.ParallelState(device=torch.device("cpu"))  # world size 1: the TP=1 reference
LAYOUTS = {}


def use(st):
    state._STATE = st
    return st


def layout(tp):
    if tp not in LAYOUTS:
        LAYOUTS[tp] = state.initialize(tp=tp, backend="gloo", device="cpu")
    return use(LAYOUTS[tp])


def cfg_for(style, tp, world, **kw):
    args = dict(model_style=style, num_layers=2, hidden_size=64, seq_length=SEQ, vocab_size=VOCAB,
                hidden_dropout=0.0, attention_dropout=0.0, micro_batch_size=MBS, global_batch_size=GBS,
                tensor_model_parallel_size=tp, make_vocab_size_divisible_by=DIVISIBLE, optimizer="sgd", lr=0.5,
                weight_decay=0.1, clip_grad=1.0, seed=1234)
    if style == "llama":
        args.update(num_attention_heads=8, group_query_attention=True, num_query_groups=4)
    else:
        args.update(num_attention_heads=4)
    args.update(kw)
    cfg = config_from_kwargs(world_size=world, **args)
    set_vocab_size(cfg, VOCAB)
    assert cfg.padded_vocab_size == PADDED[tp] and len(set(PADDED.values())) == 3
    return cfg


def batches(step):
    """The global batch of a step, as its GBS/MBS micro-batches (same on every rank)."""
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (GBS, SEQ + 1), generator=g)
    mask = (torch.rand(GBS, SEQ, generator=g) > 0.1).float()
    pos = torch.arange(SEQ).expand(GBS, SEQ)
    full = dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=mask, position_ids=pos)
    return [{k: v[i:i + MBS] for k, v in full.items()} for i in range(0, GBS, MBS)]


def full_tensor(param, t):
    """The single-process tensor from every TP rank's shard of t (t is param's shard or its grad)."""
    st = state.get()
    if st.tp_size == 1 or not getattr(param, "tensor_parallel", False):
        return t.detach().clone()
    parts = [torch.empty_like(t) for _ in range(st.tp_size)]
    dist.all_gather(parts, t.detach().contiguous(), group=st.groups["tp"])
    return unshard(parts, param.partition_dim, param.fused_sizes)


def replica_spread(t):
    """max |t_rank - t_rank0| over the TP group for a TP-replicated tensor (0 when identical)."""
    st = state.get()
    parts = [torch.empty_like(t) for _ in range(st.tp_size)]
    dist.all_gather(parts, t.detach().contiguous(), group=st.groups["tp"])
    return max((p - parts[0]).abs().max().item() for p in parts)


# ----------------------------------------------------------------------------------------------
# 1. TP×SP×recompute training equals the TP=1 run: loss, grad norm, every gradient, every weight

def train(cfg):
    st = state.get()
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    params = dict(global_named_parameters(model))
    out = {"loss": [], "grad_norm": [], "grads": [], "weights": None, "spread": 0.0}
    initial = {name: full_tensor(p, p.data) for name, p in params.items()}
    for step in range(STEPS):
        micro = batches(step)
        mine = micro[st.dp_rank::st.dp_size]  # DP rank d takes micro-batches d, d+DP, ...
        res = train_step(cfg, model, opt, None, iter(mine), len(mine))
        out["loss"].append(res.loss)
        out["grad_norm"].append(res.grad_norm)
        grads = {}
        for name, p in params.items():
            grads[name] = full_tensor(p, p.grad)
            if st.tp_size > 1 and not getattr(p, "tensor_parallel", False):
                out["spread"] = max(out["spread"], replica_spread(p.grad), replica_spread(p.data))
        out["grads"].append(grads)
    out["weights"] = {name: full_tensor(p, p.data) for name, p in params.items()}
    out["update"] = max((out["weights"][n] - initial[n]).abs().max().item() for n in initial)
    return out


def real(name, t):
    """The layout-independent part of a full tensor: vocabulary tensors without their padding rows."""
    return t[:VOCAB] if name in VOCAB_TENSORS else t


def padding_max(run):
    """max |padding row| of the vocabulary tensors' gradients (every step) and final weights."""
    tensors = [g[n] for g in run["grads"] for n in g if n in VOCAB_TENSORS]
    tensors += [w for n, w in run["weights"].items() if n in VOCAB_TENSORS]
    return max(t[VOCAB:].abs().max().item() for t in tensors)


def compare(ref, run):
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()  # noqa: E731
    grad_err = [max((rel(real(n, run["grads"][s][n]), real(n, ref["grads"][s][n])), n) for n in ref["grads"][s])
                for s in range(STEPS)]
    weight_err = max((real(n, run["weights"][n]) - real(n, ref["weights"][n])).abs().max().item()
                     for n in ref["weights"])
    names_match = all(set(run["grads"][s]) == set(ref["grads"][s]) for s in range(STEPS))
    return {"padding_max": padding_max(run), "ref_padding_max": padding_max(ref),
            "padded_rows": [run["weights"][n].shape[0] for n in VOCAB_TENSORS if n in run["weights"]],
            "ref_padded_rows": [ref["weights"][n].shape[0] for n in VOCAB_TENSORS if n in ref["weights"]],
            "loss_err": max(abs(a - b) for a, b in zip(run["loss"], ref["loss"])),
            "norm_err": max(abs(a - b) / b for a, b in zip(run["grad_norm"], ref["grad_norm"])),
            "grad_rel_err": max(e for e, _ in grad_err), "grad_rel_err_per_step": grad_err,
            "weight_err": weight_err, "names_match": names_match,
            "replica_spread": run["spread"], "losses": run["loss"], "ref_losses": ref["loss"],
            "ref_update": ref["update"]}


RECOMPUTE = {"none": {}, "full-uniform": dict(recompute_granularity="full", recompute_method="uniform",
                                              recompute_num_layers=1),
             "full-block": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
             "selective": dict(recompute_granularity="selective")}


def check_equivalence():
    out = {}
    for style in ("gpt2", "llama"):
        use(SINGLE)
        ref = train(cfg_for(style, 1, 1))
        for tp in (2, 4):
            for sp in (False, True):
                for rc, rc_kw in RECOMPUTE.items():
                    st = layout(tp)
                    run = train(cfg_for(style, tp, st.world_size, sequence_parallel=sp, **rc_kw))
                    out[f"{style}/tp{tp}/{'sp' if sp else 'nosp'}/{rc}"] = compare(ref, run)
    RESULTS["equivalence"] = out


# ----------------------------------------------------------------------------------------------
# 2. vocab-parallel cross entropy == F.cross_entropy (values and gradients), fp32 math

def check_cross_entropy():
    """Over the padded logits of each TP (large values in the padding columns, which would dominate the
    softmax if they took part) against F.cross_entropy over the VOCAB real columns; torch in fp32 and
    bf16, Triton (the interpreter on CPU) in fp32."""
    out = {}
    for tp in (2, 4):
        st, padded = layout(tp), PADDED[tp]
        g = torch.Generator().manual_seed(7)
        logits = torch.randn(5, 3, padded, generator=g) * 3
        logits[..., VOCAB:] = 20.0
        target = torch.randint(0, VOCAB, (5, 3), generator=g)
        target[0, :] = torch.tensor([0, VOCAB - 1, padded // tp])  # real-vocabulary and shard edges
        upstream = torch.rand(5, 3, generator=g)
        for ls in (0.0, 0.1):
            for dtype, backend in ((torch.float32, "torch"), (torch.bfloat16, "torch"), (torch.float32, "triton")):
                ref_in = logits.to(dtype).float().clone().requires_grad_()  # fp32 math, same values
                ref = F.cross_entropy(ref_in[..., :VOCAB].flatten(0, 1), target.flatten(), reduction="none",
                                      label_smoothing=ls).view(5, 3)
                ref.backward(upstream)
                local = shard(logits.to(dtype), 2, st.tp_rank, tp).detach().requires_grad_()
                loss = vocab_parallel_cross_entropy(local, target, label_smoothing=ls, backend=backend,
                                                    vocab_size=VOCAB)
                loss.backward(upstream)
                grad = unshard(_gather_all(local.grad.float()), 2)
                suffix = "" if backend == "torch" else "/triton"
                out[f"tp{tp}/ls{ls}/{str(dtype)[6:]}{suffix}"] = {
                    "loss_dtype": str(loss.dtype), "grad_dtype": str(local.grad.dtype),
                    "loss_err": (loss - ref).abs().max().item(),
                    "grad_err": (grad - ref_in.grad).abs().max().item(),
                    "padding_grad_max": grad[..., VOCAB:].abs().max().item(),
                    "ref_scale": ref.abs().max().item()}
    RESULTS["cross_entropy"] = out


def _gather_all(t):
    st = state.get()
    parts = [torch.empty_like(t) for _ in range(st.tp_size)]
    dist.all_gather(parts, t.contiguous(), group=st.groups["tp"])
    return parts


# ----------------------------------------------------------------------------------------------
# 3. each autograd collective: forward and backward against what it should compute

def check_mappings():
    out = {}
    for tp in (2, 4):
        st = layout(tp)
        r, n = st.tp_rank, tp

        def x_of(k):  # what rank k feeds in (every rank can compute every rank's input)
            return torch.arange(4 * n * 2 * n, dtype=torch.float32).view(4 * n, 2 * n) * (k + 1) + k

        def g_of(k, shape):  # upstream gradient on rank k; small integers, so sums are exact
            return (torch.arange(int(torch.Size(shape).numel())) % 7 - 3.0).view(shape) * (k + 2)

        cases = {
            "copy": (mappings.copy_to_tensor_parallel_region, lambda: x_of(r),
                     lambda s: sum(g_of(k, s) for k in range(n))),
            "reduce": (mappings.reduce_from_tensor_parallel_region, lambda: sum(x_of(k) for k in range(n)),
                       lambda s: g_of(r, s)),
            "scatter_last": (mappings.scatter_to_tensor_parallel_region, lambda: x_of(r).chunk(n, -1)[r],
                             lambda s: torch.cat([g_of(k, s) for k in range(n)], -1)),
            "gather_last": (mappings.gather_from_tensor_parallel_region,
                            lambda: torch.cat([x_of(k) for k in range(n)], -1),
                            lambda s: g_of(r, s).chunk(n, -1)[r]),
            "scatter_seq": (mappings.scatter_to_sequence_parallel_region, lambda: x_of(r).chunk(n, 0)[r],
                            lambda s: torch.cat([g_of(k, s) for k in range(n)], 0)),
            "gather_seq": (mappings.gather_from_sequence_parallel_region,
                           lambda: torch.cat([x_of(k) for k in range(n)], 0),
                           lambda s: sum(g_of(k, s) for k in range(n)).chunk(n, 0)[r]),
            "reduce_scatter_seq": (mappings.reduce_scatter_to_sequence_parallel_region,
                                   lambda: sum(x_of(k) for k in range(n)).chunk(n, 0)[r],
                                   lambda s: torch.cat([g_of(k, s) for k in range(n)], 0)),
        }
        for name, (fn, want_y, want_grad) in cases.items():
            x = x_of(r).requires_grad_()
            y = fn(x)
            y.backward(g_of(r, y.shape))
            out[f"tp{tp}/{name}"] = {"fwd": bool(torch.equal(y, want_y())),
                                     "bwd": bool(torch.equal(x.grad, want_grad(y.shape)))}
        try:
            mappings.scatter_to_sequence_parallel_region(torch.zeros(4 * n + 1, 2))
            out[f"tp{tp}/indivisible_error"] = False
        except ValueError as e:
            out[f"tp{tp}/indivisible_error"] = "not divisible" in str(e)
    RESULTS["mappings"] = out


# ----------------------------------------------------------------------------------------------
# 4. RNG: attention dropout differs across TP ranks, replicated dropout does not; recompute replays
#    dropout bit for bit (and a recompute that forgets the tracker does not)

def check_rng():
    out = {}
    for tp in (2, 4):
        st = layout(tp)
        random.model_parallel_seed(1234)
        ones = torch.ones(4096)
        with random.model_parallel_rng():
            tp_mask = F.dropout(ones, 0.5)
        default_mask = F.dropout(ones, 0.5)
        parts = _gather_all(tp_mask)
        out[f"tp{tp}/model_parallel_masks_all_differ"] = all(
            not torch.equal(parts[i], parts[j]) for i in range(tp) for j in range(i + 1, tp))
        out[f"tp{tp}/default_mask_spread"] = replica_spread(default_mask)
        # Forking did not consume the default stream: the same draw as without the fork.
        random.model_parallel_seed(1234)
        out[f"tp{tp}/fork_leaves_default_stream"] = bool(torch.equal(F.dropout(ones, 0.5), default_mask))

    st = layout(2)
    for style in ("gpt2", "llama"):
        for sp in (False, True):
            def loss_and_grads(rc_kw, dropout=0.1, train_mode=True):
                cfg = cfg_for(style, 2, st.world_size, sequence_parallel=sp, hidden_dropout=dropout,
                              attention_dropout=dropout, **rc_kw)
                model = build_model(cfg)
                model.train(train_mode)
                random.model_parallel_seed(99)
                b = batches(0)[0]
                loss = model(b["tokens"], b["position_ids"], labels_bs=b["labels"]).mean()
                loss.backward()
                return loss.detach(), {n: p.grad.clone() for n, p in global_named_parameters(model)}

            base_loss, base_grads = loss_and_grads({})
            no_dropout_loss, _ = loss_and_grads({}, dropout=0.0)
            key = f"{style}/{'sp' if sp else 'nosp'}"
            out[f"{key}/dropout_active"] = not torch.equal(base_loss, no_dropout_loss)
            for rc in ("full-uniform", "full-block", "selective"):
                loss, grads = loss_and_grads(RECOMPUTE[rc])
                out[f"{key}/{rc}/bitwise"] = bool(torch.equal(loss, base_loss)) and all(
                    torch.equal(grads[n], base_grads[n]) for n in base_grads)
            # Negative control: recompute that restores only the default generator (plain
            # torch.utils.checkpoint) draws other model-parallel masks, so the gradients change.
            saved = random._tracker_context_fn
            random._tracker_context_fn = lambda: (contextlib.nullcontext(), contextlib.nullcontext())
            try:
                loss, grads = loss_and_grads(RECOMPUTE["full-uniform"])
            finally:
                random._tracker_context_fn = saved
            out[f"{key}/without_tracker_differs"] = bool(torch.equal(loss, base_loss)) and not all(
                torch.equal(grads[n], base_grads[n]) for n in base_grads)
    RESULTS["rng"] = out


# ----------------------------------------------------------------------------------------------
# 5. collectives per transformer layer (and per model step), counted at the torch.distributed calls;
# reduce-scatters at megaflow's own (parallel/collectives.py: an all-to-all and a sum on gloo)

COUNTED = {(dist, "all_reduce"): "all_reduce", (dist, "all_gather"): "all_gather",
           (dist, "all_gather_single"): "all_gather", (dist, "all_gather_into_tensor"): "all_gather",
           (collectives, "reduce_scatter"): "reduce_scatter"}


log_phase = ["fwd"]  # which phase the counted collectives belong to


@contextlib.contextmanager
def counting(log):
    """Record (kind, elements of the full (unsharded) tensor) of every collective on the TP group."""
    originals = {key: getattr(*key) for key in COUNTED if hasattr(*key)}

    def wrap(key, fn):
        def counted(*args, **kwargs):
            group = kwargs.get("group")
            if group is state.get().groups.get("tp"):
                kind, tensors = COUNTED[key], args[:2]
                if key[1] == "all_gather":
                    numel = sum(t.numel() for t in tensors[0])
                elif kind == "all_reduce":
                    numel = tensors[0].numel()
                else:  # gathered output or reduce-scatter input: the larger of the two
                    numel = max(t.numel() for t in tensors)
                log.append([log_phase[0], kind, numel])
            return fn(*args, **kwargs)
        return counted

    for (module, name), fn in originals.items():
        setattr(module, name, wrap((module, name), fn))
    try:
        yield
    finally:
        for (module, name), fn in originals.items():
            setattr(module, name, fn)



def check_collective_counts():
    out = {}
    for tp in (2, 4):
        st = layout(tp)
        for style in ("gpt2", "llama"):
            for sp in (False, True):
                for rc in ("none", "full-uniform", "full-uniform+dropout", "selective"):
                    dropout = 0.1 if rc.endswith("+dropout") else 0.0
                    cfg = cfg_for(style, tp, st.world_size, sequence_parallel=sp, hidden_dropout=dropout,
                                  **RECOMPUTE[rc.split("+")[0]])
                    model = build_model(cfg)
                    layer = model.layers[0]
                    s_local = SEQ // tp if sp else SEQ
                    x = torch.randn(s_local, MBS, 64, requires_grad=True)
                    log = []
                    with counting(log):
                        log_phase[0] = "fwd"
                        y = random.checkpoint(layer, x) if rc.startswith("full") else layer(x)
                        log_phase[0] = "bwd"
                        y.sum().backward()
                    out[f"layer/tp{tp}/{style}/{'sp' if sp else 'nosp'}/{rc}"] = log
                # The whole model step (embedding, layers, output layer, loss, gradient finalize).
                cfg = cfg_for(style, tp, st.world_size, sequence_parallel=sp)
                model = build_model(cfg)
                opt = build_optimizer(cfg, model)
                log = []
                with counting(log):
                    log_phase[0] = "step"
                    train_step(cfg, model, opt, None, iter(batches(0)[:1]), 1)
                out[f"model/tp{tp}/{style}/{'sp' if sp else 'nosp'}"] = log
    RESULTS["collectives"] = out
    RESULTS["shape"] = {"seq": SEQ, "micro_batch": MBS, "hidden": 64, "layers": 2}


# ----------------------------------------------------------------------------------------------
# 6. Through the trainer: pretrain() at TP=1×DP=4, TP=2×DP=2 and TP=4×DP=1 gives the same losses; with
#    dropout, sequence parallelism and recompute, a run resumed from a checkpoint continues bit for
#    bit (the tracker's streams are in the checkpoint).

def check_trainer():
    from megaflow.training.trainer import pretrain

    def run(tp, **kw):
        args = dict(mock_data=True, tokenizer_type="NullTokenizer", vocab_size=VOCAB, num_layers=2,
                    hidden_size=64, num_attention_heads=4, seq_length=SEQ, micro_batch_size=1,
                    global_batch_size=4, train_iters=4, eval_interval=0, log_interval=100, num_workers=0,
                    lr=1e-3, device="cpu", distributed_backend="gloo", tensor_model_parallel_size=tp,
                    make_vocab_size_divisible_by=DIVISIBLE, hidden_dropout=0.0, attention_dropout=0.0,
                    data_cache_path=os.path.join(OUT, "index-cache"))  # mock-data indices built once
        args.update(kw)
        return pretrain(config_from_kwargs(world_size=int(os.environ["WORLD_SIZE"]), **args)).losses

    out = {"layouts": {tp: run(tp) for tp in (1, 2, 4)}}
    drop = dict(hidden_dropout=0.1, attention_dropout=0.1, sequence_parallel=True,
                recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    ckpt = os.path.join(OUT, "ckpt")
    out["straight"] = run(2, **drop)
    out["first_half"] = run(2, save=ckpt, exit_interval=2, **drop)
    out["resumed"] = run(2, load=ckpt, **drop)
    # Negative control: the same resume without the RNG streams draws other dropout masks.
    out["resumed_without_rng"] = run(2, load=ckpt, no_load_rng=True, **drop)
    RESULTS["trainer"] = out


# ----------------------------------------------------------------------------------------------

if __name__ == "__main__":
    timings = {}
    checks = (check_mappings, check_cross_entropy, check_rng, check_collective_counts, check_equivalence,
              check_trainer)
    only = sys.argv[2].split(",") if len(sys.argv) > 2 else None  # debugging: run a subset
    for check in checks:
        if only and check.__name__ not in only:
            continue
        start = time.perf_counter()
        check()
        timings[check.__name__] = round(time.perf_counter() - start, 2)
    RESULTS["timings"] = timings
    if dist.get_rank() == 0:
        with open(os.path.join(OUT, "results.json"), "w") as fh:
            json.dump(RESULTS, fh, indent=1)
    dist.barrier()  # nobody tears down its connections while a peer still finishes a collective
    state.destroy()
