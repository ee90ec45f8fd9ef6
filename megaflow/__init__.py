"""megaflow: Megatron-style 3D-parallel GPT pretraining that runs on CPU (gloo) and GPU (NCCL)."""
__version__ = "0.1.0"
