"""Inference: the key/value cache the model accepts (cache.py) and text generation (generation.py)."""
from megaflow.inference.cache import InferenceCache
from megaflow.inference.generation import generate, load_inference_model

__all__ = ["InferenceCache", "generate", "load_inference_model"]
