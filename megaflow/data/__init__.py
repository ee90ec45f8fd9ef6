"""Data: indexed datasets, tokenizers, GPT sample construction, blending, samplers."""
