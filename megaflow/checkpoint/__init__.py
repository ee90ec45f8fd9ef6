"""Checkpoint save/load (tracker file, atomic rename, weights-only loading)."""
from megaflow.checkpoint.io import (CheckpointError, latest_iteration, load_checkpoint,  # noqa: F401
                                    save_checkpoint)
