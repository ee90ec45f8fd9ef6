"""Text generation from a megaflow checkpoint: greedy, temperature, top-k, top-p, with a KV cache.

The checkpoint may have any TP/PP layout: its full state dict (checkpoint/full_state.py) is loaded
into a single-process model. Logits of vocabulary padding rows are -inf (the model masks them) and
cut off here, so padding is never chosen greedily nor sampled.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch

from megaflow.checkpoint.full_state import load_full_state_dict, repad_vocab
from megaflow.inference.cache import InferenceCache


def load_inference_model(ckpt_dir: str, iteration: Optional[int] = None, dtype: torch.dtype = torch.float32):
    """(cfg, model): the checkpoint's model as one process (TP=PP=1), in eval mode."""
    cfg, state_dict = load_full_state_dict(ckpt_dir, iteration)
    return cfg, model_from_state_dict(cfg, state_dict, dtype)


def model_from_state_dict(cfg, state_dict: dict, dtype: torch.dtype = torch.float32):
    from megaflow.model import GPTModel
    cfg, state_dict = repad_vocab(cfg, state_dict, tp=1)
    cfg = copy.deepcopy(cfg)
    cfg.parallel.pipeline_model_parallel_size = 1
    cfg.parallel.sequence_parallel = False
    cfg.world_size = cfg.data_parallel_size = 1
    model = GPTModel(cfg)
    model.load_state_dict(state_dict, strict=True)
    return model.to(dtype).eval()


def _next_token(logits_v: torch.Tensor, greedy: bool, temperature: float, top_k: int, top_p: float,
                generator: Optional[torch.Generator]) -> int:
    if greedy or temperature == 0:
        return int(logits_v.argmax())
    logits_v = logits_v.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits_v, min(top_k, logits_v.numel())).values[-1]
        logits_v = logits_v.masked_fill(logits_v < kth, float("-inf"))
    probs = logits_v.softmax(-1)
    if top_p < 1.0:
        # Nucleus: keep the most likely tokens whose cumulative probability reaches top_p (at least one).
        sorted_p, order = probs.sort(descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


@torch.no_grad()
def generate(model, prompt_ids: Sequence[int], max_new_tokens: int, greedy: bool = True,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_id: Optional[int] = None,
             use_cache: bool = True, seed: Optional[int] = None) -> list[int]:
    """The new token ids (at most max_new_tokens; stops after eos_id when given)."""
    cfg = model.cfg
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    total = len(prompt_ids) + max_new_tokens
    if total > cfg.model.max_position_embeddings:
        raise ValueError(f"prompt ({len(prompt_ids)}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"max_position_embeddings ({cfg.model.max_position_embeddings})")
    if not 0 < top_p <= 1.0 or temperature < 0:
        raise ValueError("need 0 < top_p <= 1 and temperature >= 0")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    cache = InferenceCache(total) if use_cache else None
    step_input, new = ids, []
    for _ in range(max_new_tokens):
        logits_v = model(step_input, inference_cache=cache)[0, -1, :cfg.vocab_size]  # padding masked off
        token = _next_token(logits_v, greedy, temperature, top_k, top_p, generator)
        new.append(token)
        if eos_id is not None and token == eos_id:
            break
        ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
        step_input = ids[:, -1:] if use_cache else ids
    return new
