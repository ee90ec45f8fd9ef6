"""Sharded checkpoints (format.py), saved by every rank (save.py) and loaded at any layout (load.py);
whole-tensor tools: reshard.py (offline, any layout) and full_state.py (the model for HF conversion)."""
from megaflow.checkpoint.format import CheckpointError, latest_iteration  # noqa: F401
from megaflow.checkpoint.load import load_checkpoint  # noqa: F401
from megaflow.checkpoint.save import CheckpointWriter, save_checkpoint  # noqa: F401
