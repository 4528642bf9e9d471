"""The learning-rate schedule: nanoGPT's linear warmup then cosine decay."""

from __future__ import annotations

import math

from .config import TrainConfig


def learning_rate(it: int, cfg: TrainConfig) -> float:
    """nanoGPT's get_lr: linear warmup, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(cfg.lr_decay_iters - cfg.warmup_iters, 1)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)

