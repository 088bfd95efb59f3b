"""The single controller for on-policy RL: GRPO, Dr.GRPO, DAPO, RLOO, REINFORCE++ and PPO.

The driver owns no model. Each step it moves one BatchedDataDict through the worker groups:

    prompts -> rollout.generate -> reward.compute_reward (+ overlong shaping)
            [-> keep groups with reward spread; generate again until the batch is full]
            -> actor.compute_log_prob (old) | ref.compute_log_prob | critic.compute_values
            -> KL penalty in the reward -> advantages (here) -> critic.update_critic
            -> actor.update_policy -> weight sync actor -> rollout -> metrics

Calls on different roles that do not need each other's results run at the same time: the
log-probs and values (``|``) start as soon as the responses exist, while the reward workers
are still scoring them.

Optional pieces switch on by config: the ref group when a KL term is on
(``actor.use_kl_loss`` or ``algorithm.use_kl_in_reward``), the critic group for
``algorithm.adv_estimator=gae``, dynamic sampling with ``algorithm.filter_groups.enable``.
With ``rollout.mode=one_step_off`` the rollout group generates the next step's batch while
the actor trains on this one (see ``_next_generation``); with ``rollout.mode=async`` the
rollout workers generate continuously into a buffer that each step takes its batch from
(see ``_take_async_batch``, ``AsyncRollout`` and docs/async.md).
Read ``step`` top to bottom for the whole algorithm.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from rlflow.algorithms.advantages import compute_advantages
from rlflow.agents.environments import environment_factory
from rlflow.algorithms.kl_control import apply_kl_in_reward, build_kl_controller
from rlflow.algorithms.off_policy import correction_metrics, correction_weights
from rlflow.algorithms.reward_shaping import add_sequence_reward, overlong_penalty, varied_group_indices
from rlflow.data.batch_sizes import (
    largest_divisor_at_most,
    mini_batch_per_worker,
    optimizer_steps,
    splittable_group_count,
)
from rlflow.data.batched_data_dict import BatchedDataDict
from rlflow.data.prompt_batches import PromptBatches
from rlflow.data.custom_loading import build_custom_dataset, resolve_packer
from rlflow.data.rlhf_dataset import RLHFDataset, collate_fn
from rlflow.demo.assets import resolve_demo_path
from rlflow.distributed.worker_group import ShardedCall, WorkerGroup
from rlflow.config.schema import typed_config
from rlflow.rewards.combine import resolve_reward_fn
from rlflow.errors import ConfigError
from rlflow.models.architecture import check_model_support
from rlflow.models.lora import lora_enabled
from rlflow.distributed.worker_group import WorkerDiedError
from rlflow.trainer import checkpoint as ckpt
from rlflow.trainer.async_rollout import AsyncRollout, Segments
from rlflow.trainer.partial_rollout import token_version_metrics
from rlflow.trainer.config_checks import check_config, resolve_placement
from rlflow.trainer.preflight import check_first_rows, preflight
from rlflow.trainer.startup import (
    build_pool, init_ray_from_config, log_workers, prepare_output_dir, total_training_steps, wait_ready,
)
from rlflow.trainer.trackers import build_trackers
from rlflow.trainer.tracking import MetricsLog, PhaseTimer, PromptLedger
from rlflow.utils.torch_functional import masked_mean
from rlflow.workers.critic import CriticWorker
from rlflow.workers.policy import PolicyWorker
from rlflow.workers.reward import BatchScorer, RewardWorker
from rlflow.workers.rollout import rollout_worker_class
from rlflow.workers.rollout.policy_lag import rollout_logprob_gap

logger = logging.getLogger("rlflow")

# What each worker method reads. A call ships only these keys (a generated batch carries about
# 27), so no role pays to pickle and copy what it never looks at.
_SCORED = ("input_ids", "attention_mask", "position_ids", "responses")
CALL_KEYS = {
    "generate": ("input_ids", "attention_mask"),
    "run_episodes": ("raw_prompt", "raw_prompt_ids", "data_source", "reward_model", "extra_info", "index", "tools_kwargs"),
    "compute_reward": ("responses", "response_mask", "data_source", "reward_model", "extra_info", "index"),
    "compute_log_prob": _SCORED,
    "compute_values": _SCORED + ("response_mask",),
    "update_policy": _SCORED + (
        "response_mask", "advantages", "old_log_probs", "ref_log_probs", "returns", "rollout_log_probs",
    ),
    "update_critic": _SCORED + ("response_mask", "values", "returns"),
}


def call_view(method: str, batch: BatchedDataDict) -> BatchedDataDict:
    """The keys of ``batch`` that ``method`` reads (optional ones only when present)."""
    return BatchedDataDict({k: batch[k] for k in CALL_KEYS[method] if k in batch})


def off_policy_metrics(off_policy: Any, batch: BatchedDataDict) -> dict[str, float]:
    """``actor/off_policy/<name>``: what ``actor.off_policy`` does to this batch's loss.

    The correction is a function of the batch alone, so the driver measures it on the whole
    batch (exact global means and max, no collective); the actor applies the same function
    to its mini-batches.
    """
    if "rollout_log_probs" not in batch:
        raise ValueError(
            f"actor.off_policy.correction={off_policy.correction} needs rollout_log_probs, and the "
            "rollout returned none: use a rollout backend that reports them or set "
            "actor.off_policy.correction=none"
        )
    old, rollout, mask = batch["old_log_probs"], batch["rollout_log_probs"], batch["response_mask"]
    _, kept = correction_weights(
        off_policy.correction, old, rollout, mask,
        is_cap=off_policy.is_cap, mis_low=off_policy.mis_low, mis_high=off_policy.mis_high,
    )
    return {f"actor/off_policy/{k}": v for k, v in correction_metrics(old, rollout, mask, kept).items()}


class _DriverScoring:
    """Scoring on the driver with a ``ShardedCall``'s ``result()``."""

    def __init__(self, scorer: BatchScorer, batch: BatchedDataDict) -> None:
        self.scorer, self.batch = scorer, batch
        self._result: Optional[BatchedDataDict] = None

    def result(self) -> BatchedDataDict:
        if self._result is None:
            self._result = self.scorer.score(self.batch)
        return self._result


def weight_lag_metrics(trainer_version: int, sample_versions: list) -> dict[str, float]:
    """How many syncs behind the trained weights each sample was generated: the mean
    (``rollout/weight_lag``), the max, and the fraction of samples at each lag
    (``rollout/lag_<k>``, from 0 to the max)."""
    lags = [trainer_version - int(v) for v in sample_versions]
    out = {
        "rollout/weight_lag": sum(lags) / len(lags),
        "rollout/weight_lag_max": float(max(lags)),
    }
    for k in range(max(lags) + 1):
        out[f"rollout/lag_{k}"] = lags.count(k) / len(lags)
    return out


# Seeds of extra dynamic-sampling rounds are offset by this much per round, far from the
# per-step seeds of round 0.
_ROUND_SEED_STRIDE = 1_000_003


@dataclass
class Generation:
    """One generation round on the rollout group, possibly still running."""

    batch: BatchedDataDict  # the prompts, each repeated rollout.n times
    call: ShardedCall  # the rollout group's generate (or run_episodes)
    # Where the prompt order stood before these prompts were drawn: while the round is in
    # flight, this is the position a checkpoint saves, so a resumed run draws them again.
    data_state: dict[str, int]


class RLTrainer:
    """Builds the worker groups for a config and runs on-policy RL training steps."""

    def __init__(
        self,
        cfg: DictConfig,
        *,
        reward_fn: Optional[Any] = None,
        train_dataset: Optional[Any] = None,
        packer: Optional[Any] = None,
    ) -> None:
        """``reward_fn``, ``train_dataset`` and ``packer`` are Python objects that replace the
        config's ``reward.*``, ``data.custom_cls`` and ``data.packer`` (handy in notebooks)."""
        cfg = resolve_placement(cfg)
        check_config(cfg)
        check_model_support(cfg)
        if cfg.trainer.algorithm != "rl":
            raise ConfigError(
                f"RLTrainer runs trainer.algorithm=rl, got '{cfg.trainer.algorithm}': use "
                "rlflow.build_trainer(cfg), which picks the trainer for the algorithm"
            )
        self.cfg = cfg
        torch.manual_seed(cfg.trainer.seed)
        self.restarts = 0

        # Everything that reads the user's files runs here, before Ray and the workers start.
        self.tokenizer = preflight(cfg, reward_fn=reward_fn)
        self.reward_fn = reward_fn
        self.packer = self._packer(packer)
        self.train_dataset = train_dataset if train_dataset is not None else self._dataset(cfg.data.train_files)
        if cfg.agent.enable:  # the tools and the environment load here, not first in a worker
            environment_factory(typed_config(cfg), resolve_reward_fn(cfg.reward, reward_fn))
        if not cfg.agent.enable or cfg.agent.environment == "tools":  # else the environment scores
            check_first_rows(cfg, self.train_dataset, reward_fn)
        self.val_dataset = self._dataset(cfg.data.val_files) if cfg.trainer.test_freq > 0 else None
        self.batches = PromptBatches(
            len(self.train_dataset), cfg.data.train_batch_size, cfg.data.shuffle, cfg.data.seed
        )
        per_epoch = self.batches.batches_per_epoch
        self.total_steps = total_training_steps(cfg.trainer, per_epoch)
        self.global_step = 0
        self.weight_version = 0
        # one_step_off: the next step's generation, started during this step.
        self.in_flight: Optional[Generation] = None
        # async: the continuously generating rollout group and its buffer.
        self.async_rollout: Optional[AsyncRollout] = None

        alg = cfg.algorithm
        self.use_critic = alg.adv_estimator == "gae"
        self.use_kl_in_reward = alg.use_kl_in_reward
        self.generate_method = "run_episodes" if cfg.agent.enable else "generate"
        # The actor's workers generate with their own model: no rollout group, nothing to sync.
        self.rollout_in_actor = cfg.rollout.placement == "in_actor"
        self.generation_role = "actor" if self.rollout_in_actor else "rollout"
        self.driver_scorer = None
        if cfg.reward.num_workers == 0 and not cfg.agent.enable:
            self.driver_scorer = BatchScorer(typed_config(cfg).reward, self.tokenizer, reward_fn)
        self.use_ref = cfg.actor.use_kl_loss or self.use_kl_in_reward
        # With LoRA the reference policy is the actor's own frozen base (adapters off); with
        # ref.in_actor a frozen copy in the actor's workers. Either way no ref workers start.
        self.ref_in_actor = self.use_ref and (lora_enabled(cfg.actor.lora) or cfg.ref.in_actor)
        # The controller lives in the driver: its coefficient is one number per step.
        self.kl_ctrl = build_kl_controller(alg.kl_ctrl) if self.use_kl_in_reward else None

        self.groups: dict[str, WorkerGroup] = {}
        self.trackers = []
        self.output_dir, self._run_lock = prepare_output_dir(cfg)
        try:
            self.metrics = MetricsLog(self.output_dir)
            self.ledger = PromptLedger(self.output_dir)
            resume_from = ckpt.resolve_resume_path(self.output_dir, cfg.trainer.resume_mode)
            init_ray_from_config(cfg.cluster)
            self._build_worker_groups()
            log_workers(self.groups)
            if resume_from is not None:
                self.load_checkpoint(resume_from)
            self.trackers = build_trackers(
                list(cfg.trainer.logger), self.output_dir, cfg.trainer.project_name,
                cfg.trainer.experiment_name, OmegaConf.to_container(cfg, resolve=True),
            )
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- set-up
    def _packer(self, packer: Optional[Any]) -> Optional[Any]:
        spec = packer
        if spec is None and self.cfg.data.packer.path:
            spec = {"path": self.cfg.data.packer.path, "name": self.cfg.data.packer.name}
        return None if spec is None else resolve_packer(spec, config=self.cfg, tokenizer=self.tokenizer)

    def _dataset(self, files: Any) -> Any:
        dcfg = self.cfg.data
        resolved = [resolve_demo_path(str(f)) for f in files]
        if dcfg.custom_cls.path:
            return build_custom_dataset(dcfg.custom_cls.path, dcfg.custom_cls.name, dcfg, self.tokenizer, resolved)
        return RLHFDataset(
            resolved,
            self.tokenizer,
            prompt_key=dcfg.prompt_key,
            max_prompt_length=dcfg.max_prompt_length,
            truncation=dcfg.truncation,
            filter_overlong_prompts=dcfg.filter_overlong_prompts,
            # Multi-turn episodes start from the messages (the environment may add tools).
            return_raw_chat=dcfg.return_raw_chat or self.cfg.agent.enable,
            return_full_prompt=dcfg.return_full_prompt,
            max_samples=dcfg.max_samples,
            filter_overlong_prompts_workers=dcfg.filter_overlong_prompts_workers,
            apply_chat_template_kwargs=OmegaConf.to_container(dcfg.apply_chat_template_kwargs),
        )

    def _collate(self, rows: list) -> BatchedDataDict:
        """Dataset rows -> the prompt batch: through the packer when one is configured."""
        if self.packer is None:
            return collate_fn(rows)
        return self.packer.rollout_collate_fn([self.packer.get_rollout_input(row) for row in rows])

    def _optimizer_steps(self, role_cfg: Any, training_steps: int) -> int:
        return optimizer_steps(
            self.cfg.data.train_batch_size, role_cfg.ppo_mini_batch_size, role_cfg.ppo_epochs, training_steps
        )

    def _build_worker_groups(self) -> None:
        cfg = self.cfg
        # Workers get the schema's dataclasses: typed values, no re-parsing on their side.
        typed = typed_config(cfg)

        def group(worker_cls, name: str, role_cfg: Any, **kwargs) -> WorkerGroup:
            return WorkerGroup(
                worker_cls, name, build_pool(name, role_cfg), init_kwargs={"config": typed, **kwargs}, wait=False
            )

        # The actor sits out the critic warm-up, so its LR schedule spans the remaining steps.
        warmup = min(self.total_steps, cfg.trainer.critic_warmup) if self.use_critic else 0
        actor_steps = self.total_steps - warmup
        self.groups["actor"] = group(
            PolicyWorker, "actor", cfg.actor, role="actor", total_steps=self._optimizer_steps(cfg.actor, actor_steps),
            with_reference=self.ref_in_actor,
        )
        if self.use_ref and not self.ref_in_actor:
            self.groups["ref"] = group(PolicyWorker, "ref", cfg.ref, role="ref")
        if self.use_critic:
            self.groups["critic"] = group(
                CriticWorker, "critic", cfg.critic, total_steps=self._optimizer_steps(cfg.critic, self.total_steps)
            )
        reward_kwargs = {"score_fn": self.reward_fn} if self.reward_fn is not None else {}
        if cfg.agent.enable:  # environments score their episodes inside the rollout workers
            self.groups["rollout"] = group(rollout_worker_class(cfg.rollout.backend), "rollout", cfg.rollout, **reward_kwargs)
        else:
            if not self.rollout_in_actor:
                self.groups["rollout"] = group(rollout_worker_class(cfg.rollout.backend), "rollout", cfg.rollout)
            if cfg.reward.num_workers > 0:
                self.groups["reward"] = group(RewardWorker, "reward", cfg.reward, **reward_kwargs)
        wait_ready(self.groups)
        if cfg.rollout.mode == "async":
            self.async_rollout = AsyncRollout(
                self.groups["rollout"], self.generate_method, self.batches, self._prompt_batch,
                lambda batch: call_view(self.generate_method, batch), self._rollout_worker_lost,
                train_batch_size=cfg.data.train_batch_size,
                prompts_per_call=cfg.rollout.async_prompts_per_call,
                max_staleness=cfg.rollout.max_weight_staleness,
                weight_version=self.weight_version,
                segments=Segments(
                    cfg.rollout.partial_segment_tokens, cfg.data.max_response_length, self.tokenizer.pad_token_id
                ) if cfg.rollout.partial_rollout else None,
            )
            self._restart_async_rollout(pending=[])

    # ----------------------------------------------------------------- one step
    def step(self) -> dict[str, Any]:
        """Run one training step and return its metrics (also appended to metrics.jsonl)."""
        cfg = self.cfg
        timer = PhaseTimer()
        step_start = time.perf_counter()
        metrics: dict[str, Any] = {"step": self.global_step + 1, "epoch": self._data_position()["epoch"]}

        # Rollouts; with dynamic sampling only the groups whose rewards differ, scored already.
        # Otherwise their scoring is still running (`scoring`) while the next calls start.
        batch, sampled, scoring = self._collect_batch(timer, metrics)
        # How many syncs behind the actor's weights the responses were sampled (0 on-policy).
        metrics.update(weight_lag_metrics(self.weight_version, sampled["weight_version"]))
        if "rollout_token_version" in sampled:  # partial rollouts: lag per token
            metrics.update(token_version_metrics(
                self.weight_version, sampled["rollout_token_version"], sampled["response_mask"]
            ))

        if batch is not None:
            # Old and reference log-probs and values need no rewards: their workers start now.
            old = self._start_log_probs("actor", batch) if self._needs_old_log_probs() else None
            ref = self._start_log_probs("ref", batch) if self.use_ref else None
            values = self._start_call("critic", "compute_values", batch) if self.use_critic else None
            if scoring is not None:
                self._finish_scoring(timer, batch, scoring)

            if old is not None:
                with timer.phase("old_log_prob"):
                    self._keep_generating(old)
                    batch["old_log_probs"] = old.result()["log_probs"]
                if "rollout_log_probs" in batch:
                    # How far the rollout engine's numbers drift from the trainer's.
                    metrics.update(rollout_logprob_gap(
                        batch["rollout_log_probs"], batch["old_log_probs"], batch["response_mask"]
                    ))

            if self.cfg.actor.recompute_old_log_prob == "rollout":
                batch["old_log_probs"] = batch["rollout_log_probs"]

            if ref is not None:
                with timer.phase("ref"):
                    self._keep_generating(ref)
                    batch["ref_log_probs"] = ref.result()["log_probs"]

            if values is not None:
                with timer.phase("values"):
                    batch["values"] = values.result()["values"]

            with timer.phase("adv"):
                if self.kl_ctrl is not None:
                    rewards, kl_metrics = apply_kl_in_reward(
                        batch["token_level_scores"], batch["old_log_probs"], batch["ref_log_probs"],
                        batch["response_mask"], self.kl_ctrl, cfg.algorithm.kl_penalty,
                    )
                    batch["token_level_rewards"] = rewards
                    metrics.update(kl_metrics)
                else:
                    batch["token_level_rewards"] = batch["token_level_scores"]
                advantages, returns = compute_advantages(
                    cfg.algorithm.adv_estimator,
                    token_level_rewards=batch["token_level_rewards"],
                    response_mask=batch["response_mask"],
                    group_index=batch["uid"],
                    values=batch["values"] if self.use_critic else None,
                    norm_by_std=cfg.algorithm.norm_adv_by_std_in_grpo,
                    gamma=cfg.algorithm.gamma,
                    lam=cfg.algorithm.lam,
                )
                batch["advantages"], batch["returns"] = advantages, returns

            if self.use_critic:
                with timer.phase("update_critic"):
                    rank_metrics = self.groups["critic"].call_sharded_metrics(
                        "update_critic", call_view("update_critic", batch),
                        mini_batch_size=self._per_worker_mini_batch(cfg.critic),
                    )
                    metrics.update(rank_metrics[0])  # reduced over ranks inside the update

            # PPO's critic warm-up: the actor waits until the values mean something.
            if not self.use_critic or self.global_step >= cfg.trainer.critic_warmup:
                if cfg.actor.off_policy.correction != "none":
                    metrics.update(off_policy_metrics(cfg.actor.off_policy, batch))
                with timer.phase("update_actor"):
                    update = self._start_call(
                        "actor", "update_policy", batch,
                        mini_batch_size=self._per_worker_mini_batch(cfg.actor),
                    )
                    self._keep_generating(update)
                    metrics.update(update.per_rank()[0])  # identical on every rank
                with timer.phase("sync_weights"):
                    self._sync_weights()
            metrics.update(self._training_metrics(batch))

        self.global_step += 1
        self.ledger.log(self.global_step, sampled["dataset_index"][:: cfg.rollout.n])
        metrics.update(self._rollout_metrics(sampled))
        metrics.update(timer.timings)
        step_time = time.perf_counter() - step_start
        metrics["timing/step_s"] = step_time
        num_tokens = int(sampled["attention_mask"].sum())
        metrics["throughput/tokens_per_s"] = num_tokens / step_time
        metrics["weight_version"] = self.weight_version
        metrics["trainer/restarts"] = float(self.restarts)
        test_freq = cfg.trainer.test_freq
        if self.val_dataset is not None and (self.global_step % test_freq == 0 or self.global_step == self.total_steps):
            with timer.phase("validate"):
                metrics.update(self.validate())
            metrics["timing/validate_s"] = timer.timings["timing/validate_s"]
        self._log(metrics)
        save_freq = cfg.trainer.save_freq
        if save_freq > 0 and (self.global_step % save_freq == 0 or self.global_step == self.total_steps):
            self.save_checkpoint()
        return metrics

    def _log(self, metrics: dict[str, Any]) -> None:
        self.metrics.log(metrics)
        for tracker in self.trackers:
            tracker.log(metrics, int(metrics["step"]))

    # ----------------------------------------------------------------- validation
    def validate(self) -> dict[str, float]:
        """Greedy (``rollout.val_temperature``) answers to every val prompt, scored: ``val/...``."""
        cfg = self.cfg
        rows = [self.val_dataset[i] for i in range(len(self.val_dataset))]
        batch = self._collate(rows)
        temperature = cfg.rollout.val_temperature
        batch.update(self._call_sharded(
            self.generation_role, self.generate_method, batch, seed=self.global_step, temperature=temperature,
            do_sample=temperature > 0, expected_weight_version=self.weight_version,
        ))
        if not cfg.agent.enable:  # episodes are scored by their environment
            batch.update(self._start_scoring(batch).result())
        scores = batch["scores"].float()
        out = {"val/reward/mean": scores.mean().item(),
               "val/response_length/mean": batch["response_mask"].sum(-1).float().mean().item()}
        by_source: dict[str, list[float]] = {}
        for source, score in zip(batch["data_source"], scores.tolist()):
            by_source.setdefault(str(source), []).append(score)
        for source, values in by_source.items():
            out[f"val/reward/{source}"] = sum(values) / len(values)
        return out

    # ----------------------------------------------------------------- checkpoints
    def _trained_roles(self) -> list[str]:
        return ["actor"] + (["critic"] if self.use_critic else [])

    def save_checkpoint(self) -> str:
        state = {
            "global_step": self.global_step,
            "weight_version": self.weight_version,
            "batches": self._data_position(),
            "kl_ctrl": self.kl_ctrl.state_dict() if self.kl_ctrl is not None else None,
            "restarts": self.restarts,
        }
        if self.async_rollout is not None:
            # Drawn but not trained yet (buffered or being generated): not consumed.
            state["prompts_pending"] = [list(p) for p in self.async_rollout.pending()]

        def write_parts(folder: str) -> None:
            # Start every role's save before waiting on any, so the roles write in parallel.
            pending = [
                (self.groups[role], self.groups[role].call_all_async("save_checkpoint", os.path.join(folder, role)))
                for role in self._trained_roles()
            ]
            for wg, refs in pending:
                wg.get(refs, "save_checkpoint")

        path = ckpt.save_checkpoint(
            self.output_dir, self.global_step, state, OmegaConf.to_yaml(self.cfg, resolve=True),
            write_parts, max_to_keep=self.cfg.trainer.max_ckpt_to_keep,
        )
        tqdm.write(f"[rlflow] checkpoint saved: {path}")
        return path

    def load_checkpoint(self, path: str) -> None:
        """Restore the trainer, its trained workers and the rollout weights from ``path``."""
        state = ckpt.load_trainer_state(path)
        # A generation in flight belongs to the position being left; the checkpoint's own
        # position draws its prompts again if they are due.
        self.in_flight = None
        for role in self._trained_roles():
            self.groups[role].call_all("load_checkpoint", os.path.join(path, role))
        self.global_step = int(state["global_step"])
        self.batches.load_state_dict(state["batches"])
        if self.kl_ctrl is not None and state.get("kl_ctrl") is not None:
            self.kl_ctrl.load_state_dict(state["kl_ctrl"])
        self.restarts = max(self.restarts, int(state.get("restarts", 0)))
        ckpt.load_rng(os.path.join(path, "driver_rng.pt"))
        # The rollout engine starts from the base model: give it the restored weights.
        self.weight_version = int(state["weight_version"]) - 1
        if self.async_rollout is not None:
            self._restart_async_rollout(pending=state.get("prompts_pending", []))
        self._sync_weights()
        self.metrics.truncate_after(self.global_step)
        self.ledger.truncate_after(self.global_step)
        tqdm.write(f"[rlflow] resumed from {path} at step {self.global_step}")

    # ----------------------------------------------------------------- rollouts
    def _data_position(self) -> dict[str, int]:
        """The prompt order's position as a checkpoint saves it. Prompts of an in-flight
        generation are not consumed yet: a resumed run draws and generates them again, so each
        prompt of an epoch is trained on exactly once. (async: the position of the next draw;
        the prompts drawn but not trained are saved apart, see ``save_checkpoint``.)"""
        return self.in_flight.data_state if self.in_flight is not None else self.batches.state_dict()

    def _start_generation(self, timer: PhaseTimer, seed: int, trained_at_version: int) -> Generation:
        """Draw the next prompt batch and start ``rollout.n`` responses to each.

        ``trained_at_version`` is the actor weight version the responses will be trained
        against; the rollout workers check that they lag it by at most
        ``rollout.max_weight_staleness`` syncs.
        """
        with timer.phase("data"):
            data_state = self.batches.state_dict()
            batch = self._prompt_batch(self.batches.next_indices())
        with timer.phase("gen"):
            call = self._start_call(
                self.generation_role, self.generate_method, batch, seed=seed,
                expected_weight_version=trained_at_version,
            )
        return Generation(batch, call, data_state)

    def _prompt_batch(self, indices: list[int]) -> BatchedDataDict:
        """The dataset rows ``indices`` as prompts, each repeated ``rollout.n`` times."""
        prompts = self._collate([self.train_dataset[i] for i in indices])
        # One id per prompt: its n responses form a group (GRPO, RLOO, dynamic sampling).
        prompts["uid"] = [str(uuid.uuid4()) for _ in range(prompts.size)]
        prompts["dataset_index"] = list(indices)  # for the prompt ledger
        return prompts.repeat_interleave(self.cfg.rollout.n)

    def _finish_generation(
        self, timer: PhaseTimer, generation: Generation
    ) -> tuple[BatchedDataDict, Optional[ShardedCall]]:
        """Wait for ``generation``'s responses; returns the batch and the reward workers'
        scoring of it, started but not awaited (see ``_finish_scoring``)."""
        batch = generation.batch
        with timer.phase("gen"):
            batch.update(generation.call.result())
        if self.cfg.agent.enable:  # episodes are scored by their environment
            return batch, None
        return batch, self._start_scoring(batch)

    def _start_scoring(self, batch: BatchedDataDict) -> Any:
        """The reward workers' scoring of ``batch`` in flight, or, with ``reward.num_workers=0``,
        the driver's, done when its result is first asked for (after the log-prob calls start)."""
        if "reward" in self.groups:
            return self._start_call("reward", "compute_reward", batch)
        return _DriverScoring(self.driver_scorer, call_view("compute_reward", batch))

    def _generate(self, timer: PhaseTimer, round_idx: int) -> tuple[BatchedDataDict, Optional[ShardedCall]]:
        """One on-policy generation round of this step, run to the end (dynamic sampling)."""
        seed = self.global_step + round_idx * _ROUND_SEED_STRIDE
        return self._finish_generation(timer, self._start_generation(timer, seed, self.weight_version))

    def _next_generation(self, timer: PhaseTimer) -> Generation:
        """This step's generation round. In ``one_step_off`` mode it was started during the
        previous step (the first step starts its own), and the next step's round starts now,
        before this step trains: it samples with the current weights, one sync behind the
        weights it will be trained against. The rollout workers run calls in order, so this
        step's weight sync queues behind it."""
        current = self.in_flight
        if current is None:
            current = self._start_generation(timer, self.global_step, self.weight_version)
        self.in_flight = None
        next_step = self.global_step + 1
        if self.cfg.rollout.mode == "one_step_off" and next_step < self.total_steps:
            self.in_flight = self._start_generation(timer, next_step, self.weight_version + 1)
        return current

    def _finish_scoring(self, timer: PhaseTimer, batch: BatchedDataDict, scoring: Optional[ShardedCall]) -> None:
        """Wait for the scores of ``batch`` and add them (with overlong shaping) in place."""
        cfg = self.cfg
        with timer.phase("reward"):
            if scoring is not None:
                batch.update(scoring.result())
            ob = cfg.reward.overlong_buffer
            if ob.enable:
                penalty = overlong_penalty(
                    batch["response_mask"].sum(-1), cfg.data.max_response_length,
                    ob.len, ob.penalty_factor,
                )
                batch["token_level_scores"] = add_sequence_reward(
                    batch["token_level_scores"], batch["response_mask"], penalty
                )
                batch["overlong_penalty"] = penalty

    def _collect_batch(
        self, timer: PhaseTimer, metrics: dict[str, Any]
    ) -> tuple[Optional[BatchedDataDict], BatchedDataDict, Optional[ShardedCall]]:
        """Returns ``(training batch or None, every response sampled this step, its scoring
        still in flight or None when the batch is scored)``.

        Without dynamic sampling both are the one generated batch. With it, each round keeps
        the groups whose ``filter_groups.metric`` varies; rounds continue with new prompts
        until ``data.train_batch_size`` groups are kept or ``max_num_gen_batches`` rounds
        have run. The kept groups are then trimmed to the largest count the training workers
        can split evenly (None when that is zero: no group carried a learning signal).
        """
        cfg = self.cfg
        fcfg = cfg.algorithm.filter_groups
        if cfg.rollout.mode == "async":
            batch = self._take_async_batch(timer, metrics)
            return batch, batch, None if cfg.agent.enable else self._start_scoring(batch)
        if not fcfg.enable:
            batch, scoring = self._finish_generation(timer, self._next_generation(timer))
            return batch, batch, scoring

        n = cfg.rollout.n
        target = cfg.data.train_batch_size
        rounds: list[BatchedDataDict] = []
        kept: list[BatchedDataDict] = []
        num_kept = 0
        while num_kept < target and len(rounds) < fcfg.max_num_gen_batches:
            batch, scoring = self._generate(timer, round_idx=len(rounds))
            self._finish_scoring(timer, batch, scoring)
            rounds.append(batch)
            signal = batch["scores"] if fcfg.metric == "score" else batch["token_level_scores"].sum(-1)
            rows = varied_group_indices(batch["uid"], signal)
            if rows:
                kept.append(batch.select_indices(rows))
                num_kept += len(rows) // n

        num_groups = self._trainable_group_count(min(num_kept, target))
        metrics["filter_groups/num_gen_batches"] = float(len(rounds))
        metrics["filter_groups/num_kept_groups"] = float(num_kept)
        metrics["filter_groups/num_train_groups"] = float(num_groups)
        metrics["filter_groups/kept_ratio"] = num_kept / float(len(rounds) * target)
        sampled = BatchedDataDict.from_batches(rounds)
        if num_groups == 0:
            return None, sampled, None
        merged = BatchedDataDict.from_batches(kept)
        return merged.select_indices(list(range(num_groups * n))), sampled, None

    def _take_async_batch(self, timer: PhaseTimer, metrics: dict[str, Any]) -> BatchedDataDict:
        """async: the oldest ``data.train_batch_size`` buffered groups within the staleness
        bound, waiting for the rollout workers as needed (``timing/gen_s``)."""
        with timer.phase("gen"):
            groups, dropped = self.async_rollout.take(self.weight_version)
        metrics["rollout/stale_dropped"] = float(dropped)
        metrics["rollout/buffered_groups"] = float(len(self.async_rollout.buffer))
        return BatchedDataDict.from_batches([g.batch for g in groups])

    def _keep_generating(self, call: ShardedCall) -> None:
        """Wait for ``call``; in async mode, keep feeding the rollout workers meanwhile."""
        if self.async_rollout is not None:
            self.async_rollout.wait_for(call.refs)

    def _restart_async_rollout(self, pending: list) -> None:
        """Queue the ``pending`` prompts, then as many new ones as the remaining steps need."""
        needed = (self.total_steps - self.global_step) * self.cfg.data.train_batch_size
        self.async_rollout.weight_version = self.weight_version
        self.async_rollout.restore(pending, max(0, needed - len(pending)))

    def _trainable_group_count(self, available: int) -> int:
        """How many of ``available`` kept groups the trained roles can split evenly."""
        roles = [self.cfg.actor] + ([self.cfg.critic] if self.use_critic else [])
        shapes = [
            (int(r.num_workers), self._per_worker_mini_batch(r), int(r.ppo_micro_batch_size_per_worker))
            for r in roles
        ]
        return splittable_group_count(available, self.cfg.rollout.n, shapes)

    # ----------------------------------------------------------------- helpers
    def _per_worker_mini_batch(self, role_cfg: Any) -> int:
        return mini_batch_per_worker(role_cfg.ppo_mini_batch_size, self.cfg.rollout.n, role_cfg.num_workers)

    def _start_log_probs(self, role: str, batch: BatchedDataDict) -> ShardedCall:
        reference = role == "ref" and self.ref_in_actor
        if reference:
            role = "actor"  # the actor's workers score the reference policy
        wg = self.groups[role]
        role_cfg = self.cfg.actor if role == "actor" else self.cfg.ref
        shard = -(-batch.size // wg.world_size)
        # Micro-batches must tile the shard exactly; a filtered batch can have any size.
        micro = largest_divisor_at_most(shard, role_cfg.log_prob_micro_batch_size_per_worker)
        flag = {"reference": True} if reference else {}
        return self._start_call(role, "compute_log_prob", batch, micro_batch_size=micro, **flag)

    def _needs_old_log_probs(self) -> bool:
        if self.cfg.actor.recompute_old_log_prob == "rollout":
            return False  # the sampling policy's own log-probs serve (KL in reward included)
        if self.use_kl_in_reward:
            return True  # the KL penalty in the reward is measured on the sampling policy
        if self.cfg.actor.off_policy.correction != "none":
            return True  # the correction compares the trainer's log-probs with the rollout's
        mode = self.cfg.actor.recompute_old_log_prob
        if mode == "always":
            return True
        if mode == "never":
            return False
        if self.cfg.rollout.mode in ("one_step_off", "async"):
            return True  # sampled one sync ago or more: the gap to the rollout's log-probs shows the drift
        # Exactly on-policy (a single optimiser step per batch): the old log-probs equal the
        # current ones, so the update uses the detached current values and saves a forward pass.
        acfg = self.cfg.actor
        return not (acfg.ppo_epochs == 1 and acfg.ppo_mini_batch_size == self.cfg.data.train_batch_size)

    def _start_call(self, role: str, method: str, batch: BatchedDataDict, **kwargs: Any) -> ShardedCall:
        return self.groups[role].call_sharded_async(method, call_view(method, batch), **kwargs)

    def _call_sharded(self, role: str, method: str, batch: BatchedDataDict, **kwargs: Any) -> BatchedDataDict:
        return self._start_call(role, method, batch, **kwargs).result()

    def _sync_weights(self) -> None:
        if self.rollout_in_actor:
            self.weight_version += 1
            self.groups["actor"].call_all("use_own_weights", self.weight_version)
            return
        refs = [r for r in self.groups["actor"].call_all("publish_weights") if r is not None]
        self.weight_version += 1
        if self.async_rollout is not None:
            # Not awaited: each worker applies it between two of its generate calls.
            self.async_rollout.push_weights(refs[0], self.weight_version)
            return
        self.groups["rollout"].call_all("update_weights", refs[0], self.weight_version)

    # ----------------------------------------------------------------- metrics
    def _rollout_metrics(self, sampled: BatchedDataDict) -> dict[str, float]:
        """What the policy did this step: every sampled response, filtered or not."""
        scores = sampled["scores"].float()
        resp_len = sampled["response_mask"].sum(-1).float()
        # the prompt's columns only: a multi-turn response also holds observation tokens
        prompt_len = sampled["attention_mask"][:, : sampled["prompts"].shape[1]].sum(-1).float()
        max_len = self.cfg.data.max_response_length
        out = {
            "reward/mean": scores.mean().item(),
            "reward/max": scores.max().item(),
            "reward/min": scores.min().item(),
            "reward/std": scores.std().item() if scores.numel() > 1 else 0.0,
            "response_length/mean": resp_len.mean().item(),
            "response_length/max": resp_len.max().item(),
            "response_length/clip_ratio": (resp_len >= max_len).float().mean().item(),
            "prompt_length/mean": prompt_len.mean().item(),
        }
        if "overlong_penalty" in sampled:
            out["reward/overlong_penalty"] = sampled["overlong_penalty"].float().mean().item()
        # Samples whose scorer raised or timed out (scored reward.error_score instead).
        if "reward_failed" in sampled and "reward_timed_out" in sampled:
            timeouts = float(sampled["reward_timed_out"].sum())
            out["reward/num_errors"] = float(sampled["reward_failed"].sum()) + timeouts
            out["reward/num_timeouts"] = timeouts
        for key in sampled.keys():
            if key.startswith("reward_extra/"):
                out[f"reward/{key.split('/', 1)[1]}"] = sampled[key].float().mean().item()
            elif key.startswith("agent/"):  # per-sample counts of multi-turn episodes
                out[key] = sampled[key].float().mean().item()
        return out

    @staticmethod
    def _training_metrics(batch: BatchedDataDict) -> dict[str, float]:
        """What the update saw: the (possibly filtered) training batch."""
        mask = batch["response_mask"]
        out = {
            "advantages/mean": masked_mean(batch["advantages"], mask).item(),
            "returns/mean": masked_mean(batch["returns"], mask).item(),
            "train/num_responses": float(batch.size),
        }
        if "values" in batch:
            out["values/mean"] = masked_mean(batch["values"], mask).item()
        if "token_level_rewards" in batch:
            out["reward/token_level_rewards_mean"] = batch["token_level_rewards"].sum(-1).float().mean().item()
        return out

    # ----------------------------------------------------------------- loop
    def fit(self, num_steps: Optional[int] = None) -> list[dict[str, Any]]:
        """Train until ``trainer.total_steps`` (or ``num_steps`` more steps); returns the metrics.

        With validation on (``trainer.test_freq > 0``) and ``trainer.val_before_train``, a first
        row ``{"step": 0, "val/...": ...}`` records the starting point.
        """
        if self.global_step == 0 and self.val_dataset is not None and self.cfg.trainer.val_before_train:
            # the starting point, as verl's val_before_train: a step-0 row with val/ metrics
            start = {"step": 0, **self.validate()}
            self._log(start)
            tqdm.write(MetricsLog.console_line(start))
        end = self.total_steps if num_steps is None else min(self.total_steps, self.global_step + num_steps)
        bar = tqdm(
            total=self.total_steps, initial=self.global_step, desc="rlflow", unit="step",
            disable=not self.cfg.trainer.progress_bar, dynamic_ncols=True,
        )
        try:
            while self.global_step < end:
                try:
                    metrics = self.step()
                except WorkerDiedError as err:
                    self._recover(err)
                    bar.n = self.global_step
                    bar.refresh()
                    continue
                bar.update(1)
                bar.set_postfix({"reward": f"{metrics['reward/mean']:.3f}"})
                tqdm.write(MetricsLog.console_line(metrics))
        finally:
            bar.close()
        if self.cfg.trainer.export_hf:
            from rlflow.export import export_from_actor_group

            path = export_from_actor_group(self.groups["actor"], self.cfg, os.path.join(self.output_dir, "hf_model"))
            tqdm.write(f"[rlflow] exported the policy as a Hugging Face model: {path}")
        return self.metrics.history

    def _count_restart(self, err: WorkerDiedError) -> None:
        """One more restart, or ``err`` again when ``trainer.max_restarts`` are used up."""
        self.restarts += 1
        limit = self.cfg.trainer.max_restarts
        if self.restarts > limit:
            raise err
        logger.warning("worker died (%s); restart %d of %d", err, self.restarts, limit)

    def _rollout_worker_lost(self, err: WorkerDiedError, num_prompts: int) -> None:
        """async: a rollout worker died; ``AsyncRollout`` replaces just that worker and
        generates its unfinished prompts again, so training goes on from where it is."""
        self._count_restart(err)
        tqdm.write(
            f"[rlflow] a rollout worker died ({str(err).splitlines()[0]}); replacing it and generating "
            f"its {num_prompts} unfinished prompt(s) again, restart {self.restarts} of "
            f"{self.cfg.trainer.max_restarts}"
        )

    def _recover(self, err: WorkerDiedError) -> None:
        """A worker process died: rebuild every group and continue from the last checkpoint."""
        self._count_restart(err)
        limit = self.cfg.trainer.max_restarts
        tqdm.write(f"[rlflow] a worker died ({str(err).splitlines()[0]}); restart {self.restarts} of {limit}")
        self.close(trackers=False)
        self._build_worker_groups()
        log_workers(self.groups)
        resume_from = ckpt.resolve_resume_path(self.output_dir, "auto")
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        else:
            # No checkpoint yet: start over from the base model and the first batch.
            self.global_step, self.weight_version = 0, 0
            self.batches.load_state_dict({"epoch": 0, "batch_in_epoch": 0})
            if self.async_rollout is not None:
                self._restart_async_rollout(pending=[])
            self.metrics.truncate_after(0)
            self.ledger.truncate_after(0)

    def close(self, trackers: bool = True) -> None:
        """Stop the workers; unless only they are being rebuilt (``trackers=False``), also close
        the trackers and release the run folder."""
        # An in-flight generation is dropped: its workers are killed below and its prompts
        # were never counted as consumed (see _data_position).
        self.in_flight = None
        self.async_rollout = None
        for wg in self.groups.values():
            try:
                wg.shutdown()
            except Exception:  # noqa: BLE001 - a dead group must not stop the others from closing
                logger.warning("shutting down role %s failed", wg.role, exc_info=True)
        self.groups.clear()
        if trackers:
            for tracker in self.trackers:
                tracker.close()
            self.trackers = []
            self._run_lock.release()
