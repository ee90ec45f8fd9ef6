"""Fused ops, one file each: a plain-torch reference, a Triton kernel, an autograd Function, and a
dispatch function chosen by backend name ("auto" = Triton on CUDA, torch elsewhere)."""
