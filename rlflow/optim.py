"""Optimiser and learning-rate schedule for trainable roles."""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from rlflow.errors import ConfigError

LR_SCHEDULERS = ("constant", "cosine", "linear")


def build_optimizer(params: Iterable[torch.nn.Parameter], optim_cfg: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        [p for p in params if p.requires_grad],
        lr=optim_cfg.lr,
        betas=tuple(float(b) for b in optim_cfg.betas),
        eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay,
        # The foreach path groups DTensor shards fine, but the plain loop keeps CPU memory flat.
        foreach=False,
    )


def build_lr_scheduler(optimizer: torch.optim.Optimizer, optim_cfg: Any, total_steps: int):
    """Linear warm-up for ``warmup_steps`` optimiser steps, then constant, cosine or linear decay
    to ``min_lr_ratio`` of the peak by ``total_steps``."""
    kind = optim_cfg.lr_scheduler
    if kind not in LR_SCHEDULERS:
        raise ConfigError(f"actor.optim.lr_scheduler '{kind}' is unknown: use one of {', '.join(LR_SCHEDULERS)}")
    warmup = max(0, optim_cfg.warmup_steps)
    floor = optim_cfg.min_lr_ratio
    total = max(int(total_steps), warmup + 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return floor + (1 - floor) * (1 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
