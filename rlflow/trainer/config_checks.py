"""Checks on a composed config that the schema's types cannot express.

They run in the driver before any worker starts, so a wrong combination fails in seconds with
a message that names the keys and suggests values, instead of deep inside a Ray actor.
"""

from __future__ import annotations

from typing import Any, Iterable

from omegaconf import DictConfig

from rlflow.errors import ConfigError

ROLLOUT_BACKENDS = ("hf",)
POLICY_LOSSES = ("ppo_clip", "gspo")
RECOMPUTE_MODES = ("auto", "always", "never")
TRUNCATION_MODES = ("left", "right", "middle", "error")
LOGGERS = ("console",)


def _one_of(key: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{key}='{value}' is not valid: use one of {', '.join(choices)}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _positive(cfg: DictConfig, *keys: str) -> None:
    for key in keys:
        node: Any = cfg
        for part in key.split("."):
            node = node[part]
        if node is None or node <= 0:
            raise ConfigError(f"{key}={node} must be a positive number")


def check_config(cfg: DictConfig) -> None:
    from rlflow.algorithms.advantages import ADVANTAGE_ESTIMATORS
    from rlflow.algorithms.losses import AGG_MODES

    _one_of("rollout.backend", cfg.rollout.backend, ROLLOUT_BACKENDS)
    _one_of("algorithm.adv_estimator", cfg.algorithm.adv_estimator, ADVANTAGE_ESTIMATORS)
    _one_of("actor.loss_agg_mode", cfg.actor.loss_agg_mode, AGG_MODES)
    _one_of("actor.policy_loss", cfg.actor.policy_loss, POLICY_LOSSES)
    _one_of("actor.recompute_old_log_prob", cfg.actor.recompute_old_log_prob, RECOMPUTE_MODES)
    _one_of("data.truncation", cfg.data.truncation, TRUNCATION_MODES)
    for name in cfg.trainer.logger:
        _one_of("trainer.logger", name, LOGGERS)
    _positive(
        cfg,
        "data.train_batch_size", "data.max_prompt_length", "data.max_response_length", "rollout.n",
        "actor.num_workers", "actor.ppo_mini_batch_size", "actor.ppo_micro_batch_size_per_worker",
        "actor.ppo_epochs", "rollout.num_workers", "ref.num_workers", "reward.num_workers",
    )

    batch = int(cfg.data.train_batch_size)
    mini = int(cfg.actor.ppo_mini_batch_size)
    if batch % mini:
        raise ConfigError(
            f"data.train_batch_size={batch} is not divisible by actor.ppo_mini_batch_size={mini}: "
            f"use a mini-batch size from {_divisors(batch)}"
        )
    n = int(cfg.rollout.n)
    workers = int(cfg.actor.num_workers)
    if (mini * n) % workers:
        good = [d for d in _divisors(mini * n) if d <= 64]
        raise ConfigError(
            f"actor.ppo_mini_batch_size x rollout.n = {mini}x{n} = {mini * n} responses cannot be "
            f"split evenly over actor.num_workers={workers}: use actor.num_workers from {good}"
        )
