"""Generation: the KV cache changes nothing but speed; sampling options do what they say."""
import pytest
import torch

from megaflow.inference import InferenceCache, generate
from tests.unit.test_hf_conversion import VOCAB, make

PROMPT = [17, 3, 250, 41, 99, 7]


@pytest.mark.parametrize("style", ["llama_gqa", "gpt2"])
def test_cached_decoding_matches_full_recompute(style):
    _, model, _ = make(style)
    ids = torch.tensor([PROMPT])
    cache = InferenceCache(max_length=32)
    with torch.no_grad():
        step_logits = [model(ids, inference_cache=cache)[0, -1]]
        for _ in range(10):
            nxt = step_logits[-1][:VOCAB].argmax().view(1, 1)
            ids = torch.cat([ids, nxt], dim=1)
            step_logits.append(model(nxt, inference_cache=cache)[0, -1])
        full = model(ids)[0, len(PROMPT) - 1:]
    assert cache.offset == ids.shape[1]
    torch.testing.assert_close(torch.stack(step_logits), full, rtol=1e-5, atol=1e-5)
    with_cache = generate(model, PROMPT, 24, use_cache=True)
    assert with_cache == generate(model, PROMPT, 24, use_cache=False)
    assert len(set(with_cache)) > 1  # a degenerate repeat would prove little


def test_sampling_options():
    _, model, _ = make("llama_gqa")
    greedy = generate(model, PROMPT, 12)
    assert generate(model, PROMPT, 12, greedy=False, temperature=0) == greedy
    assert generate(model, PROMPT, 12, greedy=False, top_k=1, seed=3) == greedy
    assert generate(model, PROMPT, 12, greedy=False, top_p=1e-6, seed=3) == greedy
    a = generate(model, PROMPT, 12, greedy=False, temperature=1.5, seed=5)
    assert a == generate(model, PROMPT, 12, greedy=False, temperature=1.5, seed=5)  # seeded: reproducible
    assert a != greedy
    eos = greedy[3]
    assert generate(model, PROMPT, 12, eos_id=eos) == greedy[:greedy.index(eos) + 1]


def test_vocabulary_padding_is_never_generated():
    cfg, _, _ = make("llama_gqa")

    class PaddingLovingModel(torch.nn.Module):
        """Logits where the padding ids (>= the real vocabulary) always win."""
        def __init__(self):
            super().__init__()
            self.cfg, self.w = cfg, torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids, inference_cache=None):
            logits = torch.zeros(ids.shape + (cfg.padded_vocab_size,))
            logits[..., VOCAB:] = 100.0
            logits[..., 5] = 1.0
            return logits

    model = PaddingLovingModel()
    assert cfg.padded_vocab_size > VOCAB
    assert generate(model, PROMPT, 4, use_cache=False) == [5, 5, 5, 5]
    assert max(generate(model, PROMPT, 8, greedy=False, seed=0, use_cache=False)) < VOCAB


def test_cache_rejects_several_tokens_after_a_prefix():
    _, model, _ = make("gpt2")
    cache = InferenceCache(max_length=16)
    model(torch.tensor([PROMPT]), inference_cache=cache)
    with pytest.raises(ValueError, match="one token at a time"):
        model(torch.tensor([[1, 2]]), inference_cache=cache)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, PROMPT, 100)
