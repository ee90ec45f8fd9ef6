"""A decoder-only GPT in two styles, built only from megaflow's tensor-parallel layers.

    GPT-2 style: LayerNorm, learned absolute positions, GeLU MLP, biases, tied input/output embeddings.
    Llama style: RMSNorm, RoPE, SwiGLU MLP, grouped-query attention, no biases, untied output layer.

Attention is model/attention.py's (multi-head or grouped-query) or, with --multi-latent-attention,
model/mla.py's (DeepSeek-V3); model/spec.py picks it and the MLP (dense or MoE) for each layer.

Parallelism enters only through the layer classes (tensor parallelism) and the stage flags
`pre_process` (this stage owns the embedding) / `post_process` (final norm, output layer, loss).

Shape legend: b batch, s sequence (s/tp under sequence parallelism), h hidden, n heads on this rank,
g query groups (kv heads) on this rank, d head dim, v vocabulary on this rank (padded / tp).

Vocabulary padding (cfg.padded_vocab_size - cfg.vocab_size rows, so that TP divides the vocabulary)
takes no part: the loss excludes those logits columns, returned logits carry -inf there, and their
embedding/output rows start at 0 (model/init.py) and never get a gradient, so they stay 0.
Activations flow as x_sbh (sequence first, as in Megatron: sequence parallelism splits dim 0).

Dropout: attention dropout acts on this rank's heads, so it draws from the TP rank's own stream
(random.model_parallel_rng); hidden/embedding dropout acts on activations replicated across TP, so it
uses the default stream (same mask on every TP rank), except under sequence parallelism, where each
rank holds other tokens and the model-parallel stream is used. Recompute replays both streams.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from megaflow.config import Config
from megaflow.layers.linear import column_parallel_matmul
from megaflow.layers.mlp import MLP  # noqa: F401  (re-exported: its home was this file)
from megaflow.layers import ColumnParallelLinear, VocabParallelCrossEntropy, VocabParallelEmbedding, build_norm
from megaflow.layers.embedding import vocab_parallel_lookup
from megaflow.model.attention import SelfAttention, rotary_tables  # noqa: F401  (SelfAttention: re-exported)
from megaflow.model.mtp import MultiTokenPrediction
from megaflow.model.spec import build_attention, build_mlp
from megaflow.parallel import mappings, random, state


class TransformerLayer(nn.Module):
    """Pre-norm block: x + dropout(attn(norm(x))), then x + dropout(mlp(norm(x)))."""

    def __init__(self, cfg: Config, layer_number: int):
        super().__init__()
        m, sp = cfg.model, cfg.parallel.sequence_parallel
        self.layer_number = layer_number  # global, 0-based: names and initial values follow it
        output_std = m.init_method_std / math.sqrt(2.0 * m.num_layers)
        self.input_norm = build_norm(m.normalization, m.hidden_size, m.norm_epsilon, m.norm_backend, sp)
        self.self_attention = build_attention(cfg, output_std)  # standard or multi-latent (model/spec.py)
        self.pre_mlp_norm = build_norm(m.normalization, m.hidden_size, m.norm_epsilon, m.norm_backend, sp)
        self.mlp = build_mlp(cfg, layer_number, output_std)  # dense MLP or MoE (model/spec.py)
        self.hidden_dropout, self.sequence_parallel = m.hidden_dropout, sp

    def _dropout(self, x_sbh):
        return random.dropout(x_sbh, self.hidden_dropout, self.training, model_parallel=self.sequence_parallel)

    def forward(self, x_sbh, inference_cache=None, context=None):
        x_sbh = x_sbh + self._dropout(self.self_attention(self.input_norm(x_sbh), inference_cache, context))
        return x_sbh + self._dropout(self.mlp(self.pre_mlp_norm(x_sbh)))


def stage_layer_numbers(cfg: Config, pp_rank: int, pp_size: int, virtual_rank: int = 0) -> list[int]:
    """Global layer numbers held by a pipeline stage: even split, or uneven first/last stages. With
    --num-layers-per-virtual-pipeline-stage k, rank r's chunk v holds virtual stage v·PP + r: layers
    [(v·PP + r)·k, (v·PP + r + 1)·k) (Megatron's interleaved assignment)."""
    n, p = cfg.model.num_layers, cfg.parallel
    if p.num_layers_per_virtual_pipeline_stage is not None and pp_size > 1:
        k = p.num_layers_per_virtual_pipeline_stage
        start = (virtual_rank * pp_size + pp_rank) * k
        return list(range(start, start + k))
    first, last = p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers
    counts = [None] * pp_size
    if pp_size > 1 and first is not None:
        counts[0] = first
    if pp_size > 1 and last is not None:
        counts[-1] = last
    rest = n - sum(c for c in counts if c is not None)
    free = [i for i, c in enumerate(counts) if c is None]
    if free:
        if rest % len(free):
            raise ValueError(f"--num-layers {n} leaves {rest} layers for {len(free)} middle stages: "
                             "not divisible")
        for i in free:
            counts[i] = rest // len(free)
    start = sum(counts[:pp_rank])
    return list(range(start, start + counts[pp_rank]))


class GPTModel(nn.Module):
    def __init__(self, cfg: Config, pre_process: bool = True, post_process: bool = True,
                 layer_numbers: Optional[list[int]] = None):
        super().__init__()
        m, st = cfg.model, state.get()
        self.cfg, self.pre_process, self.post_process = cfg, pre_process, post_process
        self.sequence_parallel = cfg.parallel.sequence_parallel
        self.share_embeddings = not m.untie_embeddings_and_output_weights
        vocab = cfg.padded_vocab_size
        true_vocab = cfg.vocab_size if cfg.vocab_size is not None else vocab  # the tokenizer's ids
        if pre_process:
            self.word_embeddings = VocabParallelEmbedding(vocab, m.hidden_size, m.init_method_std,
                                                          unpadded_vocab_size=true_vocab)
            # Tied, with the output layer on a later stage: that stage holds a copy (below); the two
            # gradients are summed over the embedding group (optim/grads.py).
            # Multi-token prediction on a later stage keeps a copy too, tied or not (model/mtp.py).
            self.word_embeddings.weight.shared_embedding = (self.share_embeddings or bool(m.mtp_num_layers)) \
                and not post_process
            if m.position_embedding_type == "learned_absolute":
                self.position_embeddings = nn.Embedding(m.max_position_embeddings, m.hidden_size,
                                                        device=st.device)
                self.position_embeddings.weight.init_std = m.init_method_std
                # Replicated across TP; under sequence parallelism each rank adds it to its own tokens,
                # so its gradient is all-reduced across TP (optim/grads.py).
                self.position_embeddings.weight.sequence_parallel = self.sequence_parallel
        layer_numbers = list(range(m.num_layers)) if layer_numbers is None else layer_numbers
        self.layers = nn.ModuleList(TransformerLayer(cfg, i) for i in layer_numbers)
        if post_process:
            self.final_norm = build_norm(m.normalization, m.hidden_size, m.norm_epsilon, m.norm_backend,
                                         self.sequence_parallel)
            if not (self.share_embeddings and pre_process):
                self.output_layer = ColumnParallelLinear(m.hidden_size, vocab, bias=False,
                                                         sequence_parallel=self.sequence_parallel,
                                                         init_std=m.init_method_std)
                # A tied output layer on a later stage is a copy of the word embeddings: it gets the
                # same initial values and its gradient is summed with theirs (embedding group).
                self.output_layer.weight.shared_embedding = self.share_embeddings
                self.output_layer.weight.vocab_rows = true_vocab
            self.lm_loss = VocabParallelCrossEntropy(true_vocab, label_smoothing=m.label_smoothing)
            if m.mtp_num_layers:  # multi-token prediction (model/mtp.py) on the last stage
                if not pre_process and not self.share_embeddings:
                    # It embeds tokens too: a copy of the word embeddings, kept equal to the first
                    # stage's through the embedding group, as a tied output layer is.
                    self.mtp_embeddings = VocabParallelEmbedding(vocab, m.hidden_size, m.init_method_std,
                                                                 unpadded_vocab_size=true_vocab)
                    self.mtp_embeddings.weight.shared_embedding = True
                self.mtp = MultiTokenPrediction(cfg)
        self.recompute = m.recompute_granularity == "full"
        self.recompute_method, self.recompute_num_layers = m.recompute_method or "uniform", \
            m.recompute_num_layers or 1
        self.embedding_dropout = m.hidden_dropout

    def embed(self, input_ids_bs, position_ids_bs=None):
        ids_sb = input_ids_bs.t()
        # Each rank looks up its vocabulary range; the sum over ranks is reduce-scattered along the
        # sequence under sequence parallelism (x_sbh is then this rank's s/tp tokens).
        x_sbh = self.word_embeddings.forward_reduced(ids_sb, sequence_parallel=self.sequence_parallel)
        if hasattr(self, "position_embeddings"):
            pos_sb = (torch.arange(ids_sb.shape[0], device=ids_sb.device).unsqueeze(1)
                      if position_ids_bs is None else position_ids_bs.t())
            if self.sequence_parallel:
                pos_sb = mappings.scatter_to_sequence_parallel_region(pos_sb)
            x_sbh = x_sbh + self.position_embeddings(pos_sb)
        return random.dropout(x_sbh, self.embedding_dropout, self.training,
                              model_parallel=self.sequence_parallel)

    def _run_layers(self, x_sbh, inference_cache=None, context=None):
        if not (self.recompute and self.training):
            for layer in self.layers:
                x_sbh = layer(x_sbh, inference_cache, context)
            return x_sbh
        n, k = len(self.layers), self.recompute_num_layers
        if self.recompute_method == "uniform":  # checkpoint every chunk of k layers
            for start in range(0, n, k):
                chunk = self.layers[start:start + k]
                x_sbh = random.checkpoint(lambda x, c=chunk: _run_chunk(c, x, context), x_sbh)
            return x_sbh
        for i, layer in enumerate(self.layers):  # "block": checkpoint the first k layers only
            x_sbh = random.checkpoint(layer, x_sbh, None, context) if i < k else layer(x_sbh, None, context)
        return x_sbh

    def _attention_context(self, position_ids_bs, cu_seqlens_bt):
        """What every layer's attention needs besides its input: RoPE tables at the tokens' true
        positions (one [s, d] table when every sample has the same positions) and the documents."""
        m = self.cfg.model
        rotary = None
        if m.position_embedding_type == "rope" and position_ids_bs is not None:
            pos = position_ids_bs[0] if bool((position_ids_bs == position_ids_bs[:1]).all()) else position_ids_bs
            if pos.dim() == 1 and torch.equal(pos, torch.arange(pos.numel(), device=pos.device)):
                return None if cu_seqlens_bt is None else (None, cu_seqlens_bt)  # 0..s-1: cached tables
            rotary = rotary_tables(m, pos.shape[-1], pos.device, position_ids=pos)
        return None if rotary is None and cu_seqlens_bt is None else (rotary, cu_seqlens_bt)

    def _logits(self, x_sbh):
        if hasattr(self, "output_layer"):
            return self.output_layer(x_sbh)
        return column_parallel_matmul(x_sbh, self.word_embeddings.weight, sequence_parallel=self.sequence_parallel)

    def _embed_tokens(self, ids_sb):
        """Word embeddings of ids [s, b] on the last stage (multi-token prediction): the model's own
        table, its copy, or the tied output layer's copy of it."""
        if hasattr(self, "word_embeddings"):
            return self.word_embeddings.forward_reduced(ids_sb, sequence_parallel=self.sequence_parallel)
        if hasattr(self, "mtp_embeddings"):
            return self.mtp_embeddings.forward_reduced(ids_sb, sequence_parallel=self.sequence_parallel)
        return vocab_parallel_lookup(self.output_layer.weight, ids_sb, self.sequence_parallel)

    def forward(self, input_ids_bs=None, position_ids_bs=None, labels_bs=None, hidden_sbh=None,
                inference_cache=None, cu_seqlens_bt=None, loss_mask_bs=None):
        """First stage: input ids -> hidden. Middle: hidden -> hidden. Last stage: -> logits, or the
        per-token loss [b, s] when labels are given. With an inference_cache (inference/cache.py) the
        tokens continue the cached ones: keys/values are appended and positions start after them.
        position_ids_bs are the tokens' positions (any stage: RoPE rotates by them; under context
        parallelism they are this rank's zigzag chunks); cu_seqlens_bt [b, t] the packed documents'
        boundaries (attention stays inside each document). loss_mask_bs: which labels count, for the
        multi-token-prediction losses (trained only when given, in training mode)."""
        if inference_cache is not None and position_ids_bs is None and self.pre_process:
            position_ids_bs = inference_cache.position_ids(input_ids_bs)
        x_sbh = self.embed(input_ids_bs, position_ids_bs) if self.pre_process else hidden_sbh
        context = None if inference_cache is not None else self._attention_context(position_ids_bs, cu_seqlens_bt)
        x_sbh = self._run_layers(x_sbh, inference_cache, context)
        if inference_cache is not None:
            inference_cache.advance(x_sbh.shape[0])
        if not self.post_process:
            return x_sbh
        logits_sbv = self._logits(self.final_norm(x_sbh))
        if labels_bs is None:
            return self.lm_loss.mask_padding(logits_sbv).transpose(0, 1)
        loss_bs = self.lm_loss(logits_sbv, labels_bs.t()).t()
        if hasattr(self, "mtp") and self.training and loss_mask_bs is not None:
            loss_bs = self.mtp.attach_loss(loss_bs, x_sbh, labels_bs, loss_mask_bs, self._embed_tokens,
                                           self._logits, self.lm_loss, context)
        return loss_bs


def _run_chunk(layers, x, context=None):
    for layer in layers:
        x = layer(x, None, context)
    return x

