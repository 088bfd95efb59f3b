"""Checks on a composed config that the schema's types cannot express.

They run in the driver before any worker starts, so a wrong combination fails in seconds with
a message that names the keys and suggests values, instead of deep inside a Ray actor.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

from omegaconf import DictConfig

from rlflow.data.batch_sizes import divisors
from rlflow.errors import ConfigError

ROLLOUT_BACKENDS = ("hf", "vllm")
ROLLOUT_MODES = ("sync", "one_step_off", "async")
PLACEMENTS = ("auto", "split", "colocated", "in_actor")
TRAINER_ALGORITHMS = ("rl", "dpo")
FILTER_METRICS = ("score", "seq_reward")
POLICY_LOSSES = ("ppo_clip", "gspo")
RECOMPUTE_MODES = ("auto", "always", "never", "rollout")
TRUNCATION_MODES = ("left", "right", "middle", "error")
LOGGERS = ("console", "tensorboard", "wandb", "mlflow")
# Estimators whose baseline is the mean of a prompt's group: a group of one gives all-zero
# advantages, so nothing is learnt.
GROUP_ESTIMATORS = ("grpo", "rloo", "reinforce_plus_plus_baseline")


def _one_of(key: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{key}='{value}' is not valid: use one of {', '.join(choices)}")


def _positive(cfg: DictConfig, *keys: str) -> None:
    for key in keys:
        node: Any = cfg
        for part in key.split("."):
            node = node[part]
        if node is None or node <= 0:
            raise ConfigError(f"{key}={node} must be a positive number")


def _non_negative(key: str, value: Any) -> None:
    if value is None or value < 0:
        raise ConfigError(f"{key}={value} must be >= 0: set {key} to 0 or a positive value")


def check_config(cfg: DictConfig) -> None:
    """Check a composed config for the trainer that ``trainer.algorithm`` selects."""
    _one_of("trainer.algorithm", cfg.trainer.algorithm, TRAINER_ALGORITHMS)
    _one_of("data.truncation", cfg.data.truncation, TRUNCATION_MODES)
    for name in cfg.trainer.logger:
        _one_of("trainer.logger", name, LOGGERS)
    _non_negative("trainer.test_freq", cfg.trainer.test_freq)
    if cfg.trainer.total_steps is not None and cfg.trainer.total_steps < 0:
        raise ConfigError(
            f"trainer.total_steps={cfg.trainer.total_steps} must be >= 0 "
            "(0 or null: run trainer.total_epochs over the data)"
        )
    _positive(cfg, "trainer.total_epochs")
    from rlflow.models.loading import DTYPES

    _one_of("model.dtype", cfg.model.dtype, DTYPES)
    _non_negative("actor.optim.lr", cfg.actor.optim.lr)
    if cfg.trainer.algorithm == "dpo":
        check_dpo_config(cfg)
    else:
        check_rl_config(cfg)
    from rlflow.models.lora import check_lora_config

    check_lora_config(cfg)


def check_agent_config(cfg: DictConfig) -> None:
    from rlflow.agents.tools import PARSERS

    acfg = cfg.agent
    _positive(cfg, "agent.max_turns")
    if acfg.max_tokens_per_turn is not None:
        _positive(cfg, "agent.max_tokens_per_turn")
    for key in ("tool_timeout_s", "step_timeout_s"):
        if acfg[key] is not None:
            _non_negative(f"agent.{key}", acfg[key])
    if acfg.environment == "tools" and not acfg.environment_path and not acfg.tools:
        raise ConfigError("agent.environment=tools needs agent.tools (e.g. [calculator] or [file.py:function])")
    if acfg.tool_parser not in PARSERS and ":" not in acfg.tool_parser:
        raise ConfigError(
            f"agent.tool_parser='{acfg.tool_parser}' is not valid: use one of {', '.join(PARSERS)} or file.py:function"
        )


def check_rl_config(cfg: DictConfig) -> None:
    from rlflow.algorithms.advantages import ADVANTAGE_ESTIMATORS
    from rlflow.algorithms.kl_control import KL_CONTROLLER_TYPES
    from rlflow.algorithms.losses import AGG_MODES, KL_KINDS

    alg = cfg.algorithm
    _one_of("rollout.backend", cfg.rollout.backend, ROLLOUT_BACKENDS)
    _check_rollout_mode(cfg)
    _check_in_actor_rollout(cfg)
    _check_partial_rollout(cfg)
    _one_of("algorithm.adv_estimator", cfg.algorithm.adv_estimator, ADVANTAGE_ESTIMATORS)
    _one_of("actor.loss_agg_mode", cfg.actor.loss_agg_mode, AGG_MODES)
    _one_of("actor.policy_loss", cfg.actor.policy_loss, POLICY_LOSSES)
    _one_of("actor.recompute_old_log_prob", cfg.actor.recompute_old_log_prob, RECOMPUTE_MODES)
    _positive(
        cfg,
        "data.train_batch_size", "data.max_prompt_length", "data.max_response_length", "rollout.n",
        "actor.num_workers", "actor.ppo_mini_batch_size", "actor.ppo_micro_batch_size_per_worker",
        "actor.ppo_epochs", "rollout.num_workers", "ref.num_workers",
    )
    if alg.adv_estimator in GROUP_ESTIMATORS and cfg.rollout.n < 2:
        raise ConfigError(
            f"algorithm.adv_estimator={alg.adv_estimator} compares each response with the other "
            f"responses to its prompt, so rollout.n={cfg.rollout.n} gives all-zero advantages: "
            "set rollout.n >= 2 (e.g. 8)"
        )
    for key in ("temperature", "val_temperature"):
        _non_negative(f"rollout.{key}", cfg.rollout[key])
    _non_negative("reward.num_workers", cfg.reward.num_workers)
    if cfg.agent.enable:
        check_agent_config(cfg)
    if not 0.0 < cfg.rollout.top_p <= 1.0:
        raise ConfigError(f"rollout.top_p={cfg.rollout.top_p} must be in (0, 1]")
    if cfg.actor.use_kl_loss:
        _one_of("actor.kl_loss_type", cfg.actor.kl_loss_type, KL_KINDS)
    _check_off_policy(cfg)
    _check_mini_batches(cfg, "actor")
    _check_micro_batching(cfg, "actor")
    _check_micro_batching(cfg, "ref")
    _non_negative("trainer.critic_warmup", cfg.trainer.critic_warmup)

    if alg.use_kl_in_reward:
        _one_of("algorithm.kl_penalty", alg.kl_penalty, KL_KINDS)
        _one_of("algorithm.kl_ctrl.type", alg.kl_ctrl.type, KL_CONTROLLER_TYPES)
        _non_negative("algorithm.kl_ctrl.kl_coef", alg.kl_ctrl.kl_coef)
        if alg.kl_ctrl.type == "adaptive":
            _positive(cfg, "algorithm.kl_ctrl.target_kl", "algorithm.kl_ctrl.horizon")
        if cfg.actor.recompute_old_log_prob == "never":
            raise ConfigError(
                "algorithm.use_kl_in_reward=true measures the KL on the sampling policy's "
                "log-probs: set actor.recompute_old_log_prob=auto (or always)"
            )
    if alg.adv_estimator == "gae":
        _one_of("critic.loss_agg_mode", cfg.critic.loss_agg_mode, AGG_MODES)
        _positive(
            cfg,
            "critic.num_workers", "critic.ppo_mini_batch_size", "critic.ppo_micro_batch_size_per_worker",
            "critic.forward_micro_batch_size_per_worker", "critic.ppo_epochs",
        )
        _non_negative("critic.cliprange_value", cfg.critic.cliprange_value)
        _non_negative("critic.optim.lr", cfg.critic.optim.lr)
        _check_mini_batches(cfg, "critic")
    elif cfg.trainer.critic_warmup > 0:
        raise ConfigError(
            f"trainer.critic_warmup={cfg.trainer.critic_warmup} needs a critic, which only "
            "algorithm.adv_estimator=gae uses: set trainer.critic_warmup=0 or use gae"
        )

    fg = alg.filter_groups
    if fg.enable:
        _one_of("algorithm.filter_groups.metric", fg.metric, FILTER_METRICS)
        _positive(cfg, "algorithm.filter_groups.max_num_gen_batches")
        if cfg.rollout.n < 2:
            raise ConfigError(
                "algorithm.filter_groups.enable=true needs rollout.n >= 2: a group of one "
                "response has no reward spread to filter on"
            )

    for key in ("timeout_s", "batch_timeout_s"):
        if cfg.reward[key] is not None and cfg.reward[key] < 0:
            raise ConfigError(f"reward.{key}={cfg.reward[key]} must be >= 0 (0 or null: no limit)")
    ob = cfg.reward.overlong_buffer
    if ob.enable:
        max_len = cfg.data.max_response_length
        if not 0 < ob.len <= max_len:
            raise ConfigError(
                f"reward.overlong_buffer.len={ob.len} must be in [1, data.max_response_length={max_len}] "
                "when reward.overlong_buffer.enable=true"
            )
        _non_negative("reward.overlong_buffer.penalty_factor", ob.penalty_factor)


def _check_rollout_mode(cfg: DictConfig) -> None:
    """``rollout.mode=one_step_off`` and ``async`` train on responses sampled one or more weight
    syncs ago, so the lag must be allowed and something must be able to run while the actor
    trains."""
    rcfg = cfg.rollout
    _one_of("rollout.mode", rcfg.mode, ROLLOUT_MODES)
    if rcfg.max_weight_staleness is None or rcfg.max_weight_staleness < 0:
        raise ConfigError(
            f"rollout.max_weight_staleness={rcfg.max_weight_staleness} must be >= 0 (0: on-policy, "
            "k: responses may be sampled up to k weight syncs before they are trained on)"
        )
    mode = rcfg.mode
    if mode == "sync":
        return
    if rcfg.max_weight_staleness < 1:
        lag = "one sync old" if mode == "one_step_off" else "one or more syncs old"
        raise ConfigError(
            f"rollout.mode={mode} trains on responses from weights {lag}, but "
            f"rollout.max_weight_staleness={rcfg.max_weight_staleness} forbids any lag: set "
            f"rollout.max_weight_staleness={1 if mode == 'one_step_off' else 2} (or more)"
        )
    if cfg.algorithm.filter_groups.enable:
        raise ConfigError(
            f"rollout.mode={mode} cannot run with algorithm.filter_groups.enable=true: dynamic "
            "sampling decides how many prompts to generate from this step's rewards; set one of "
            "them off (rollout.mode=sync)"
        )
    if rcfg.placement == "colocated":
        raise ConfigError(
            f"rollout.mode={mode} needs rollout.placement=split: colocated rollout and actor "
            "time-share the same devices, so generation and training cannot overlap"
        )
    if mode == "async" and rcfg.async_prompts_per_call < 1:
        raise ConfigError(
            f"rollout.async_prompts_per_call={rcfg.async_prompts_per_call} must be >= 1 (e.g. 4)"
        )


def _in_actor_unmet(cfg: DictConfig) -> list[str]:
    """What keeps the actor's one worker from sampling with the model it trains: HF
    ``generate`` on an unsharded model, between two updates, one response per turn, and no
    rollout worker asked for (their number, devices or nodes)."""
    from rlflow.models.lora import lora_enabled

    rcfg = cfg.rollout
    needs = {
        "rollout.backend=hf": rcfg.backend == "hf",
        "actor.num_workers=1": cfg.actor.num_workers == 1,
        "rollout.mode=sync": rcfg.mode == "sync",
        "agent.enable=false": not cfg.agent.enable,
        "actor.lora.rank=0": not lora_enabled(cfg.actor.lora),
        "rollout.num_workers=1": rcfg.num_workers == 1,
        "rollout.gpus_per_worker=0": rcfg.gpus_per_worker == 0,
        "no rollout.custom_resources": not rcfg.custom_resources,
    }
    return [key for key, ok in needs.items() if not ok]


def resolve_placement(cfg: DictConfig) -> DictConfig:
    """``rollout.placement=auto`` is ``in_actor`` where the run allows it, else ``split``.
    Returns a copy with the chosen placement, so the caller's config still says ``auto``."""
    if cfg.rollout.placement != "auto":
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.rollout.placement = "split" if _in_actor_unmet(cfg) else "in_actor"
    return cfg


def _check_in_actor_rollout(cfg: DictConfig) -> None:
    rcfg = cfg.rollout
    _one_of("rollout.placement", rcfg.placement, PLACEMENTS)
    if rcfg.placement != "in_actor":
        return
    unmet = _in_actor_unmet(cfg)
    if unmet:
        raise ConfigError(
            f"rollout.placement=in_actor needs {', '.join(unmet)}: the actor's single, unsharded "
            "model samples between updates (or use rollout.placement=split, or auto)"
        )


def _check_partial_rollout(cfg: DictConfig) -> None:
    """Partial rollouts continue responses across weight syncs, which only the async mode has
    between calls, and only for single-turn responses (an episode's turns are not resumable)."""
    rcfg = cfg.rollout
    if not rcfg.partial_rollout:
        return
    if rcfg.mode != "async":
        raise ConfigError(
            f"rollout.partial_rollout=true needs rollout.mode=async (got rollout.mode={rcfg.mode}): "
            "only async generation takes weight syncs while responses are unfinished"
        )
    if cfg.agent.enable:
        raise ConfigError(
            "rollout.partial_rollout=true cannot run multi-turn episodes (agent.enable=true): an "
            "episode's environment state cannot be resumed; set rollout.partial_rollout=false"
        )
    if rcfg.partial_segment_tokens < 1:
        raise ConfigError(
            f"rollout.partial_segment_tokens={rcfg.partial_segment_tokens} must be >= 1 (e.g. 64)"
        )


def _check_off_policy(cfg: DictConfig) -> None:
    """``actor.off_policy``: a known correction, sensible bounds, and old log-probs to correct."""
    from rlflow.algorithms.off_policy import CORRECTIONS

    opc = cfg.actor.off_policy
    _one_of("actor.off_policy.correction", opc.correction, CORRECTIONS)
    # A cap below 1 would down-weight (tis) or drop (decoupled) tokens that are exactly on-policy.
    if not opc.is_cap >= 1.0:
        raise ConfigError(f"actor.off_policy.is_cap={opc.is_cap} must be >= 1 (e.g. 2.0)")
    if not 0.0 <= opc.mis_low < 1.0:
        raise ConfigError(f"actor.off_policy.mis_low={opc.mis_low} must be in [0, 1) (e.g. 0.5)")
    if not opc.mis_high > 1.0:
        raise ConfigError(f"actor.off_policy.mis_high={opc.mis_high} must be > 1 (e.g. 2.0)")
    if opc.correction != "none" and cfg.actor.recompute_old_log_prob in ("never", "rollout"):
        raise ConfigError(
            f"actor.off_policy.correction={opc.correction} compares the actor's old log-probs with "
            f"the rollout's, which actor.recompute_old_log_prob={cfg.actor.recompute_old_log_prob} "
            "does not compute: set actor.recompute_old_log_prob=auto (or always)"
        )


def _check_mini_batches(cfg: DictConfig, role: str) -> None:
    """``data.train_batch_size`` splits into ``<role>.ppo_mini_batch_size`` prompts, whose
    responses split evenly over the role's workers."""
    role_cfg = cfg[role]
    batch = cfg.data.train_batch_size
    mini = role_cfg.ppo_mini_batch_size
    if batch % mini:
        raise ConfigError(
            f"data.train_batch_size={batch} is not divisible by {role}.ppo_mini_batch_size={mini}: "
            f"use a mini-batch size from {divisors(batch)}"
        )
    n = cfg.rollout.n
    workers = role_cfg.num_workers
    if (mini * n) % workers:
        good = [d for d in divisors(mini * n) if d <= 64]
        raise ConfigError(
            f"{role}.ppo_mini_batch_size x rollout.n = {mini}x{n} = {mini * n} responses cannot be "
            f"split evenly over {role}.num_workers={workers}: use {role}.num_workers from {good}"
        )


def _check_micro_batching(cfg: DictConfig, role: str) -> None:
    """Dynamic batching and sequence packing exclude each other, and the token cap must hold
    the longest possible sequence (prompt + response)."""
    role_cfg = cfg[role]
    if role_cfg.use_dynamic_bsz and role_cfg.use_sequence_packing:
        raise ConfigError(
            f"{role}.use_dynamic_bsz=true and {role}.use_sequence_packing=true exclude each other: "
            f"set one of them to false"
        )
    if not (role_cfg.use_dynamic_bsz or role_cfg.use_sequence_packing):
        return
    from rlflow.data.batched_data_dict import PACKING_ALGORITHMS

    _one_of(f"{role}.packing_algorithm", role_cfg.packing_algorithm.lower(), PACKING_ALGORITHMS)
    _positive(cfg, f"{role}.max_tokens_per_microbatch", f"{role}.sequence_length_round")
    longest = cfg.data.max_prompt_length + cfg.data.max_response_length
    if role_cfg.use_dynamic_bsz:
        # dynamic micro-batches round every length up to a multiple of sequence_length_round
        step = role_cfg.sequence_length_round
        longest = -(-longest // step) * step
    cap = role_cfg.max_tokens_per_microbatch
    if cap < longest:
        raise ConfigError(
            f"{role}.max_tokens_per_microbatch={cap} cannot hold the longest sequence "
            f"(data.max_prompt_length + data.max_response_length, rounded: {longest} tokens): "
            f"raise it to at least {longest}"
        )


def check_dpo_config(cfg: DictConfig) -> None:
    from rlflow.algorithms.losses import DPO_LOSS_TYPES

    dcfg = cfg.dpo
    _one_of("dpo.loss_type", dcfg.loss_type, DPO_LOSS_TYPES)
    _positive(
        cfg,
        "data.train_batch_size", "data.max_prompt_length", "data.max_response_length",
        "actor.num_workers", "actor.ppo_micro_batch_size_per_worker", "ref.num_workers",
        "dpo.beta",
    )
    if not 0.0 <= dcfg.label_smoothing < 0.5:
        raise ConfigError(f"dpo.label_smoothing={dcfg.label_smoothing} must be in [0, 0.5)")
    _non_negative("dpo.sft_loss_coef", dcfg.sft_loss_coef)
    batch = cfg.data.train_batch_size
    workers = cfg.actor.num_workers
    if batch % workers:
        raise ConfigError(
            f"data.train_batch_size={batch} preference pairs cannot be split evenly over "
            f"actor.num_workers={workers}: use a batch size divisible by {workers}"
        )
