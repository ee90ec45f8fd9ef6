"""Weights & Biases: the same scalars as TensorBoard, from the same (logging) rank.

wandb is an optional dependency (the "wandb" extra), imported only when --wandb-project is given;
validation refuses the flag when the package is missing. WANDB_MODE=offline makes wandb write its run
files under --wandb-save-dir without any network (upload them later with `wandb sync`).
"""
from __future__ import annotations

import os

from megaflow.training import logging as log


class WandbLogger:
    """wandb.init on the logging rank only; a no-op elsewhere or without --wandb-project."""

    def __init__(self, cfg):
        self.run = None
        lg = cfg.logging
        if not lg.wandb_project or not log.is_logging_rank():
            return
        import wandb  # lazily: an optional dependency
        save_dir = lg.wandb_save_dir or (os.path.join(cfg.checkpoint.save, "wandb") if cfg.checkpoint.save
                                         else os.path.abspath("wandb"))
        os.makedirs(save_dir, exist_ok=True)
        self.run = wandb.init(project=lg.wandb_project, name=lg.wandb_exp_name, dir=save_dir,
                              config=cfg.to_dict())

    def scalars(self, it: int, values: dict) -> None:
        if self.run is None:
            return
        kept = {name: value for name, value in values.items() if value is not None}
        if kept:
            self.run.log(kept, step=it)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class ScalarWriters:
    """Every scalar sink the run has (TensorBoard, W&B), behind TensorBoardLogger's interface."""

    def __init__(self, cfg, arguments: str | None = None):
        self.writers = [log.TensorBoardLogger(cfg.logging.tensorboard_dir, arguments=arguments), WandbLogger(cfg)]

    def scalars(self, it: int, values: dict) -> None:
        for w in self.writers:
            w.scalars(it, values)

    def close(self) -> None:
        for w in self.writers:
            w.close()
