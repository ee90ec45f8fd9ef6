"""The planner's context-parallel terms: per-rank compute and activations fall with CP, the ring's
communication is counted for each --cp-comm-type, DP×CP shards ZeRO, and the layout search picks
CP > 1 for a 128k-token Llama-3-8B that does not fit otherwise."""
import pytest

from megaflow.config import config_from_kwargs, set_vocab_size
from megaflow.planner.activations import stage_activation_bytes
from megaflow.planner.memory import model_state_bytes
from megaflow.planner.perf import Cluster, step_time
from megaflow.planner.search import search

LLAMA_8B = dict(model_style="llama", num_layers=32, hidden_size=4096, ffn_hidden_size=14336,
                num_attention_heads=32, group_query_attention=True, num_query_groups=8, vocab_size=128000,
                bf16=True, hidden_dropout=0.0, attention_dropout=0.0, micro_batch_size=1)


def cfg_for(world, **kw):
    cfg = config_from_kwargs(world_size=world, **{**LLAMA_8B, "seq_length": 32768,
                                                  "max_position_embeddings": 131072, **kw})
    set_vocab_size(cfg, 128000)
    return cfg


@pytest.mark.parametrize("comm", ["p2p", "a2a", "all_gather"])
def test_cp_divides_activations_and_counts_its_communication(comm):
    one = cfg_for(8, tensor_model_parallel_size=8, global_batch_size=1)
    four = cfg_for(32, tensor_model_parallel_size=8, context_parallel_size=4, cp_comm_type=comm,
                   global_batch_size=1)
    a1, a4 = (stage_activation_bytes(c, 0, "cuda")["peak"] for c in (one, four))
    assert 3.5 < a1 / a4 < 4.1
    cluster = Cluster(gpus=32)
    t1, t4 = step_time(one, Cluster(gpus=8)), step_time(four, cluster)
    assert t1["cp_comm"] == 0 and t4["cp_comm"] > 0
    assert t4["compute"] == pytest.approx(t1["compute"] / 4, rel=1e-6)
    # ZeRO over DP×CP: 4 CP ranks of one replica each own a quarter of the optimizer state.
    z1 = cfg_for(8, tensor_model_parallel_size=8, use_distributed_optimizer=True, global_batch_size=1)
    z4 = cfg_for(32, tensor_model_parallel_size=8, context_parallel_size=4, use_distributed_optimizer=True,
                 global_batch_size=1)
    assert model_state_bytes(z4)["optimizer"] < model_state_bytes(z1)["optimizer"] / 3.5


def test_ring_hides_behind_attention_at_long_sequences():
    """p2p overlaps each step's transfer with the block in hand: at 32k tokens on NVLink it exposes
    little next to all_gather, which does not overlap."""
    times = {c: step_time(cfg_for(16, tensor_model_parallel_size=8, context_parallel_size=2, cp_comm_type=c,
                                  global_batch_size=1), Cluster(gpus=16))["cp_comm"]
             for c in ("p2p", "all_gather")}
    assert times["p2p"] < times["all_gather"]


def test_search_chooses_context_parallelism_for_128k_tokens():
    base = cfg_for(1, seq_length=131072, global_batch_size=8)
    plans = search(base, Cluster(gpus=64), fixed={"mbs", "vpp", "sp"}, device="cuda")
    fitting = [p for p in plans if p.fits]
    assert {p.cfg.parallel.context_parallel_size for p in plans} >= {1, 2, 4, 8}
    assert fitting and fitting[0].cfg.parallel.context_parallel_size > 1       # the fastest that fits
    assert "--context-parallel-size" in fitting[0].flags()
