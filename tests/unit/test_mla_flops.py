"""MFU's FLOPs for multi-latent attention (training/flops.py) against torch's FLOP counter on a real
forward: the projections (query latent, KV latent, up-projections, output) exactly; the attention core
as the kernel runs it (every position, values padded to the query/key width) against the model FLOPs
the formula counts (the causal half, the true widths)."""
import torch
from torch.utils.flop_counter import FlopCounterMode

from megaflow.config import parse_args, set_vocab_size
from megaflow.model.init import initialize_weights
from megaflow.model.mla import MultiLatentAttention
from megaflow.training.flops import attention_flops_per_token, forward_flops_per_token

S, B, H, N = 16, 2, 32, 4


def test_mla_flops_equal_the_flop_counter():
    for q_lora in (["--q-lora-rank", "24"], []):
        cfg = parse_args(["--model-style", "llama", "--num-layers", "2", "--hidden-size", str(H),
                          "--num-attention-heads", str(N), "--seq-length", str(S), "--multi-latent-attention",
                          "--kv-lora-rank", "16", "--qk-head-dim", "16", "--qk-pos-emb-head-dim", "8",
                          "--v-head-dim", "12", "--vocab-size", "100", "--tokenizer-type", "NullTokenizer",
                          "--mock-data", *q_lora])
        set_vocab_size(cfg, 101)
        layer = MultiLatentAttention(cfg, 0.02)
        initialize_weights(layer, 1)
        with FlopCounterMode(display=False) as counter:
            layer(torch.randn(S, B, H))
        counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
        qk, v = 16 + 8, 12
        core = 2 * S * N * (qk + v) * 0.5                                 # per token, causal half
        assert counts["aten.mm"] == (attention_flops_per_token(cfg) - core) * S * B
        assert counts["aten.bmm"] == core * S * B * 2 * (2 * max(qk, v)) / (qk + v)
        assert forward_flops_per_token(cfg) > 2 * attention_flops_per_token(cfg)   # the model counts it per layer
