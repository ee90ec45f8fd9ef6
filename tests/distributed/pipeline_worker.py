"""Worker for test_pipeline.py: one torchrun launch runs many pipeline configurations.

    pipeline_worker.py OUT_DIR pp4    4 ranks: PP=4 and PP=2×DP=2 equivalence, activation bounds,
                                      TP=2×PP=2 against TP=2×DP=2, sleep-emulated timelines
                                      (bench/pipeline_bubble.py) of 1F1B and interleaved
    pipeline_worker.py OUT_DIR pp2    2 ranks: PP=2 equivalence, pretrain() at PP=2 (1F1B, interleaved)
                                      with a timeline, then a neighbour that hangs (timeout)

Every equivalence check compares with the single-process model built from the same seed (same full
weights, model/init.py), run through forward_backward_no_pipelining on all DP ranks' micro-batches:
per-micro-batch losses, every gradient by global name (after finalize_gradients: DP average and the
tied-embedding sum), and the global gradient norm. Results go to OUT_DIR/<name>_rank<r>.json.
"""
import json
import math
import os
import sys
import time
import weakref
import zlib

import torch
import torch.distributed as dist

from megaflow.config import config_from_kwargs, set_vocab_size, virtual_pipeline_size
from megaflow.model import GPTModel, build_model, global_named_parameters, initialize_weights
from megaflow.optim.grads import finalize_gradients, global_grad_norm
from megaflow.parallel import p2p, state
from megaflow.pipeline import schedules

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "bench"))
from pipeline_bubble import record_sleep_timeline  # noqa: E402

OUT = None  # set by main()
VOCAB, SEQ, MBS = 100, 16, 2


def write(name, payload):
    with open(os.path.join(OUT, f"{name}_rank{dist.get_rank()}.json"), "w") as fh:
        json.dump(payload, fh)


def make_cfg(pp, layers, style, m, dp=1, vpp=None, first=None, last=None, timeout=1.0, **kw):
    args = dict(model_style=style, num_layers=layers, hidden_size=32, num_attention_heads=4, seq_length=SEQ,
                vocab_size=VOCAB, hidden_dropout=0.0, attention_dropout=0.0, micro_batch_size=MBS,
                global_batch_size=MBS * m * dp, pipeline_model_parallel_size=pp,
                num_layers_per_virtual_pipeline_stage=vpp, decoder_first_pipeline_num_layers=first,
                decoder_last_pipeline_num_layers=last, distributed_timeout_minutes=timeout, seed=7)
    if style == "llama":
        args.update(group_query_attention=True, num_query_groups=2)
    args.update(kw)
    cfg = config_from_kwargs(world_size=int(os.environ["WORLD_SIZE"]), **args)
    set_vocab_size(cfg, VOCAB)
    return cfg


def init_state(cfg):
    p = cfg.parallel
    return state.initialize(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, backend="gloo",
                            device="cpu", timeout_minutes=p.distributed_timeout_minutes,
                            virtual_pp=virtual_pipeline_size(cfg))


def make_batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = (torch.rand(MBS, SEQ, generator=g) > 0.2).float()
        mask[0, 0] = 1.0
        out.append({"tokens": torch.randint(0, VOCAB, (MBS, SEQ), generator=g),
                    "labels": torch.randint(0, VOCAB, (MBS, SEQ), generator=g),
                    "loss_mask": mask, "position_ids": torch.arange(SEQ).repeat(MBS, 1)})
    return out


def reference(cfg, batches):
    """The single-process model and its losses and gradients over all micro-batches."""
    ref = GPTModel(cfg, pre_process=True, post_process=True)
    initialize_weights(ref, cfg.training.seed)
    losses = schedules.forward_backward_no_pipelining(ref, iter(batches), len(batches))
    grads = {n: p.grad.clone() for n, p in global_named_parameters(ref)}
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
    return [float(x) for x in losses], grads, norm


def equivalence(name, cfg, m):
    st = init_state(cfg)
    model = build_model(cfg)
    batches = make_batches(m * st.dp_size, seed=zlib.crc32(name.encode()))
    mine = batches[st.dp_rank * m:(st.dp_rank + 1) * m]
    t0 = time.perf_counter()
    losses = schedules.get_forward_backward_func()(model, iter(mine), m)
    elapsed = time.perf_counter() - t0
    params = [p for p in model.parameters()]
    finalize_gradients(params)
    norm = global_grad_norm(params)
    ref_losses, ref_grads, ref_norm = reference(cfg, batches)
    grad_err = {}
    for gname, p in global_named_parameters(model):
        ref = ref_grads[gname]
        grad_err[gname] = float((p.grad - ref).abs().max() / ref.abs().max().clamp(min=1e-30))
    out = {"schedule": schedules.get_forward_backward_func().__name__, "chunks": len(schedules.model_chunks(model)),
           "pp_rank": st.pp_rank, "dp_rank": st.dp_rank, "is_last": st.is_last_stage,
           "losses": [float(x) for x in losses], "ref_losses": ref_losses[st.dp_rank * m:(st.dp_rank + 1) * m],
           "grad_err": grad_err, "ref_names": sorted(ref_grads), "norm": norm, "ref_norm": ref_norm,
           "seconds": elapsed,
           "layers": sorted({int(n.split(".")[1]) for n, _ in global_named_parameters(model)
                             if n.startswith("layers.")})}
    write(name, out)


class ActivationCounter:
    """Counts the micro-batches (chunk forwards) whose saved activations are alive, with autograd's
    saved-tensor hooks: each saved tensor is wrapped, and the wrapper dies when backward frees it.
    Also sums the storage of the stage outputs the schedule still holds (freed after sending?)."""

    def __init__(self, chunks):
        self.current, self.live, self.peak, self.peak_held_bytes = -1, {}, 0, 0
        self.outputs = []
        self.next_id = 0
        for chunk in chunks:
            chunk.register_forward_pre_hook(self._pre)
            if not chunk.post_process:
                chunk.register_forward_hook(self._post)

    def _pre(self, module, args):
        self.current, self.next_id = self.next_id, self.next_id + 1

    def _post(self, module, args, output):
        self.outputs.append(weakref.ref(output))

    def _release(self, mb):
        self.live[mb] -= 1

    def pack(self, tensor):
        mb = self.current
        self.live[mb] = self.live.get(mb, 0) + 1
        holder = _Saved(tensor)
        weakref.finalize(holder, self._release, mb)  # runs when autograd drops the saved tensor
        self.peak = max(self.peak, sum(1 for v in self.live.values() if v > 0))
        held = [ref() for ref in self.outputs]
        self.peak_held_bytes = max(self.peak_held_bytes,
                                   sum(o.untyped_storage().nbytes() for o in held if o is not None))
        return holder

    @staticmethod
    def unpack(holder):
        return holder.tensor


class _Saved:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


def activation_bound(name, cfg, m, deallocate=True):
    st = init_state(cfg)
    model = build_model(cfg)
    chunks = schedules.model_chunks(model)
    counter = ActivationCounter(chunks)
    func = schedules.get_forward_backward_func()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        func(model, iter(make_batches(m, seed=3)), m, deallocate_outputs=deallocate)
    full_bytes = SEQ * MBS * cfg.model.hidden_size * 4
    write(name, {"pp_rank": st.pp_rank, "peak": counter.peak, "peak_held_bytes": counter.peak_held_bytes,
                 "activation_bytes": full_bytes, "chunks": len(chunks), "forwards": counter.next_id,
                 "still_live": sum(1 for v in counter.live.values() if v > 0)})


def pretrain_run(name, argv):
    """pretrain() as the CLI runs it; also saves the tied embedding copies of the first and last stage."""
    from megaflow.config import parse_args
    from megaflow.training.trainer import _Trainer
    trainer = _Trainer(parse_args(argv))
    r = trainer.run()
    st = state.get()
    for gname, p in global_named_parameters(trainer.model):
        if gname == "word_embeddings.weight":
            torch.save(p.detach().clone(), os.path.join(OUT, f"{name}_embedding_rank{st.rank}.pt"))
    write(name, {"losses": r.losses, "valid_losses": r.valid_losses, "pp_rank": st.pp_rank})


def hang_and_time_out():
    """Rank 1 stops taking part; rank 0's transfer must fail after the group timeout (3 s), naming it."""
    cfg = make_cfg(2, 2, "gpt2", 2, timeout=0.05)
    st = init_state(cfg)
    if st.pp_rank == 1:
        time.sleep(5)
        write("timeout", {"pp_rank": 1})
        return
    model = build_model(cfg)
    t0 = time.perf_counter()
    try:
        schedules.get_forward_backward_func()(model, iter(make_batches(2, seed=1)), 2)
        result = {"error": None}
    except p2p.PipelineCommError as e:
        result = {"error": str(e)}
    result.update(pp_rank=0, seconds=time.perf_counter() - t0)
    write("timeout", result)


TINY = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "200", "--hidden-size", "32",
        "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "2", "--num-workers", "0",
        "--log-interval", "1", "--eval-interval", "2", "--eval-iters", "2", "--train-iters", "4", "--lr", "1e-3",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--distributed-timeout-minutes", "1"]


def main(suite):
    if suite == "pp4":
        for m in (2, 4, 6):  # below, equal to and above PP
            equivalence(f"eq_pp4_1f1b_m{m}", make_cfg(4, 4, "gpt2", m), m)
        equivalence("eq_pp4_1f1b_llama_m5", make_cfg(4, 4, "llama", 5), 5)
        equivalence("eq_pp4_uneven_m3", make_cfg(4, 6, "gpt2", 3, first=1, last=1), 3)
        for m in (4, 8):
            equivalence(f"eq_pp4_inter_m{m}", make_cfg(4, 8, "gpt2", m, vpp=1), m)
        equivalence("eq_pp4_inter_llama_m4", make_cfg(4, 8, "llama", 4, vpp=1), 4)
        equivalence("eq_pp2dp2_1f1b_m3", make_cfg(2, 4, "gpt2", 3, dp=2), 3)
        equivalence("eq_pp2dp2_inter_m2", make_cfg(2, 4, "gpt2", 2, dp=2, vpp=1), 2)
        for m in (2, 4, 6):
            activation_bound(f"act_pp4_1f1b_m{m}", make_cfg(4, 4, "gpt2", m), m)
        activation_bound("act_pp4_1f1b_m6_keep", make_cfg(4, 4, "gpt2", 6), 6, deallocate=False)
        activation_bound("act_pp4_inter_m8", make_cfg(4, 8, "gpt2", 8, vpp=1), 8)
        # TP × PP: 1F1B over tensor-parallel stages with sequence parallelism (activations [s/TP, b, h])
        # against TP × DP, which needs no pipeline; both average the same micro-batches.
        tp_common = TINY + ["--num-layers", "4", "--global-batch-size", "8", "--tensor-model-parallel-size", "2"]
        pretrain_run("train_tp2pp2", tp_common + ["--pipeline-model-parallel-size", "2", "--sequence-parallel"])
        pretrain_run("train_tp2dp2", tp_common)
        # The schedules' own bubble: stages that sleep 20 ms per forward and 40 ms per backward.
        record_sleep_timeline(os.path.join(OUT, "timeline_1f1b"), 4, 1, 8)
        record_sleep_timeline(os.path.join(OUT, "timeline_inter"), 4, 2, 8)
    else:
        for m in (1, 2, 3):
            equivalence(f"eq_pp2_1f1b_m{m}", make_cfg(2, 2, "gpt2", m), m)
        equivalence("eq_pp2_1f1b_llama_m3", make_cfg(2, 2, "llama", 3), 3)
        equivalence("eq_pp2_uneven_m2", make_cfg(2, 3, "llama", 2, first=1), 2)
        # Freed outputs and full activation recompute together (the recomputed forward runs in backward).
        equivalence("eq_pp2_recompute_m3", make_cfg(2, 4, "gpt2", 3, recompute_granularity="full"), 3)
        for m in (2, 4):
            equivalence(f"eq_pp2_inter_m{m}", make_cfg(2, 4, "gpt2", m, vpp=1), m)
        equivalence("eq_pp2_inter_llama_m4", make_cfg(2, 6, "llama", 4, vpp=1), 4)
        pretrain_run("train_pp2_1f1b", TINY + ["--num-layers", "2", "--global-batch-size", "6",
                                               "--pipeline-model-parallel-size", "2",
                                               "--pipeline-timeline-dir", os.path.join(OUT, "timeline_gpt")])
        pretrain_run("train_pp2_inter", TINY + ["--num-layers", "4", "--global-batch-size", "8",
                                                "--pipeline-model-parallel-size", "2",
                                                "--num-layers-per-virtual-pipeline-stage", "1"])
        hang_and_time_out()


if __name__ == "__main__":
    OUT = sys.argv[1]
    main(sys.argv[2])
    sys.stdout.flush()
    os._exit(0)  # skip process-group teardown (the timeout case leaves a transfer pending)
