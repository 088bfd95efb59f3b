"""The Python API that ``rlflow.main`` wraps; the same calls work from a notebook::

    import rlflow
    cfg = rlflow.compose_config("grpo", overrides=["trainer.total_steps=5"])
    trainer = rlflow.build_trainer(cfg)
    trainer.step()            # one step, returns its metrics
    trainer.fit()             # the rest of the run
    trainer.metrics.history   # list of per-step dicts (also in <output_dir>/metrics.jsonl)
    trainer.close()
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from rlflow.config.compose import compose_config
from rlflow.trainer.rl_trainer import RLTrainer


def build_trainer(cfg: DictConfig) -> RLTrainer:
    """Start Ray (or join ``cluster.address``), spawn the worker groups, return the trainer."""
    return RLTrainer(cfg)


def train(cfg: DictConfig) -> list[dict[str, Any]]:
    """Build a trainer, run it to the end, release its workers, return the per-step metrics."""
    trainer = build_trainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.close()


__all__ = ["build_trainer", "compose_config", "train"]
