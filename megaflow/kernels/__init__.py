"""Fused ops, one dispatch function each: a plain-torch reference, a Triton kernel (in the sibling
`*_triton.py` module, imported on first use) with its autograd Function, and optional CUDA packages
(flash-attn, apex) imported only when selected. "auto" = Triton on CUDA, torch elsewhere.
See docs/kernels.md."""
