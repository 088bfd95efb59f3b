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
from rlflow.errors import ConfigError
from rlflow.trainer.config_checks import TRAINER_ALGORITHMS
from rlflow.trainer.dpo_trainer import DPOTrainer
from rlflow.trainer.rl_trainer import RLTrainer


def build_trainer(cfg: DictConfig, **objects: Any) -> RLTrainer | DPOTrainer:
    """Start Ray (or join ``cluster.address``), spawn the worker groups, return the trainer.

    ``trainer.algorithm`` picks it: ``rl`` (GRPO, PPO, RLOO, ... by ``algorithm.adv_estimator``)
    gives an ``RLTrainer``, ``dpo`` a ``DPOTrainer``. Both offer ``step()``, ``fit()``,
    ``metrics.history``, ``output_dir`` and ``close()``. For RL, Python objects can stand in
    for config paths: ``reward_fn=`` (a scoring function), ``train_dataset=``, ``packer=``.
    """
    algorithm = cfg.trainer.algorithm
    if algorithm == "dpo":
        if objects:
            raise ConfigError(f"build_trainer: {', '.join(objects)} only apply to trainer.algorithm=rl")
        return DPOTrainer(cfg)
    if algorithm == "rl":
        return RLTrainer(cfg, **objects)
    raise ConfigError(
        f"trainer.algorithm='{algorithm}' is not valid: use one of {', '.join(TRAINER_ALGORITHMS)}"
    )


def train(cfg: DictConfig) -> list[dict[str, Any]]:
    """Build a trainer, run it to the end, release its workers, return the per-step metrics."""
    trainer = build_trainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.close()


__all__ = ["build_trainer", "compose_config", "train"]
