"""Optimizers, LR schedules, loss scaling and the gradient bookkeeping between backward and step."""
