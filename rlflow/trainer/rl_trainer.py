"""The single controller for on-policy RL: GRPO, Dr.GRPO, DAPO, RLOO, REINFORCE++ and PPO.

The driver owns no model. Each step it moves one BatchedDataDict through the worker groups:

    prompts -> rollout.generate -> reward.compute_reward (+ overlong shaping)
            [-> keep groups with reward spread; generate again until the batch is full]
            -> actor.compute_log_prob (old) -> ref.compute_log_prob -> critic.compute_values
            -> KL penalty in the reward -> advantages (here) -> critic.update_critic
            -> actor.update_policy -> weight sync actor -> rollout -> metrics

Optional pieces switch on by config: the ref group when a KL term is on
(``actor.use_kl_loss`` or ``algorithm.use_kl_in_reward``), the critic group for
``algorithm.adv_estimator=gae``, dynamic sampling with ``algorithm.filter_groups.enable``.
Read ``step`` top to bottom for the whole algorithm.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from rlflow.algorithms.advantages import compute_advantages
from rlflow.algorithms.kl_control import apply_kl_in_reward, build_kl_controller
from rlflow.algorithms.reward_shaping import add_sequence_reward, overlong_penalty, varied_group_indices
from rlflow.data.batched_data_dict import BatchedDataDict
from rlflow.data.prompt_batches import PromptBatches
from rlflow.data.rlhf_dataset import RLHFDataset, collate_fn
from rlflow.demo.assets import resolve_demo_path
from rlflow.distributed.ray_cluster import init_ray
from rlflow.distributed.resource_pool import ResourcePool
from rlflow.distributed.worker_group import WorkerGroup
from rlflow.errors import ConfigError
from rlflow.models.loading import load_tokenizer
from rlflow.trainer.config_checks import check_config
from rlflow.trainer.tracking import MetricsLog, PhaseTimer
from rlflow.utils.torch_functional import masked_mean
from rlflow.workers.critic import CriticWorker
from rlflow.workers.policy import PolicyWorker
from rlflow.workers.reward import RewardWorker
from rlflow.workers.rollout.hf_rollout import HFRolloutWorker

logger = logging.getLogger("rlflow")

# Seeds of extra dynamic-sampling rounds are offset by this much per round, far from the
# per-step seeds of round 0.
_ROUND_SEED_STRIDE = 1_000_003


def default_output_dir(cfg: DictConfig) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.abspath(os.path.join("outputs", cfg.trainer.experiment_name, stamp))


def largest_divisor_at_most(n: int, cap: int) -> int:
    """The largest divisor of ``n`` that is ``<= cap`` (at least 1)."""
    for d in range(max(1, min(n, cap)), 0, -1):
        if n % d == 0:
            return d
    return 1


def splittable_group_count(available: int, group_size: int, roles: list[tuple[int, int, int]]) -> int:
    """Largest ``k <= available`` such that ``k * group_size`` responses can be trained by every
    role in ``roles``, each given as ``(num_workers, mini_batch_per_worker,
    micro_batch_per_worker)``: equal shards per rank, and mini-batches (the last one may be
    shorter) that each split into whole micro-batches of ``min(micro, mini-batch)`` rows.
    0 when no ``k >= 1`` works."""
    for k in range(available, 0, -1):
        responses = k * group_size
        if all(_splittable(responses, *shape) for shape in roles):
            return k
    return 0


def _splittable(responses: int, workers: int, mini: int, micro: int) -> bool:
    if responses % workers:
        return False
    per_rank = responses // workers
    sizes = {min(mini, per_rank), per_rank % mini} - {0}
    return all(size % min(micro, size) == 0 for size in sizes)


class RLTrainer:
    """Builds the worker groups for a config and runs on-policy RL training steps."""

    def __init__(self, cfg: DictConfig) -> None:
        check_config(cfg)
        if cfg.trainer.algorithm != "rl":
            raise ConfigError(
                f"RLTrainer runs trainer.algorithm=rl, got '{cfg.trainer.algorithm}': use "
                "rlflow.build_trainer(cfg), which picks the trainer for the algorithm"
            )
        self.cfg = cfg
        self.output_dir = os.path.abspath(cfg.trainer.output_dir or default_output_dir(cfg))
        os.makedirs(self.output_dir, exist_ok=True)
        with open(os.path.join(self.output_dir, "config.yaml"), "w", encoding="utf-8") as f:
            f.write(OmegaConf.to_yaml(cfg, resolve=True))
        self.metrics = MetricsLog(self.output_dir)
        torch.manual_seed(int(cfg.trainer.seed))

        self.tokenizer = load_tokenizer(cfg.model)
        self.train_dataset = self._dataset(cfg.data.train_files)
        self.batches = PromptBatches(
            len(self.train_dataset), int(cfg.data.train_batch_size), bool(cfg.data.shuffle), int(cfg.data.seed)
        )
        per_epoch = self.batches.batches_per_epoch
        self.total_steps = int(cfg.trainer.total_steps or per_epoch * int(cfg.trainer.total_epochs))
        self.global_step = 0
        self.weight_version = 0

        alg = cfg.algorithm
        self.use_critic = alg.adv_estimator == "gae"
        self.use_kl_in_reward = bool(alg.use_kl_in_reward)
        self.use_ref = bool(cfg.actor.use_kl_loss) or self.use_kl_in_reward
        # The controller lives in the driver: its coefficient is one number per step.
        self.kl_ctrl = build_kl_controller(alg.kl_ctrl) if self.use_kl_in_reward else None

        init_ray(
            address=cfg.cluster.address,
            num_cpus=cfg.cluster.num_cpus,
            num_gpus=cfg.cluster.num_gpus,
            dashboard_host=cfg.cluster.dashboard_host,
            include_dashboard=cfg.cluster.include_dashboard,
            namespace=cfg.cluster.namespace,
            runtime_env={"env_vars": dict(cfg.cluster.env_vars)} if cfg.cluster.env_vars else None,
        )
        self.groups: dict[str, WorkerGroup] = {}
        try:
            self._build_worker_groups()
        except BaseException:
            self.close()
            raise
        self._log_workers()

    # ----------------------------------------------------------------- set-up
    def _dataset(self, files: Any) -> RLHFDataset:
        dcfg = self.cfg.data
        return RLHFDataset(
            [resolve_demo_path(str(f)) for f in files],
            self.tokenizer,
            prompt_key=dcfg.prompt_key,
            max_prompt_length=int(dcfg.max_prompt_length),
            truncation=dcfg.truncation,
            filter_overlong_prompts=bool(dcfg.filter_overlong_prompts),
            return_raw_chat=bool(dcfg.return_raw_chat),
            apply_chat_template_kwargs=OmegaConf.to_container(dcfg.apply_chat_template_kwargs),
        )

    def _optimizer_steps(self, role_cfg: Any, training_steps: int) -> int:
        per_step = (int(self.cfg.data.train_batch_size) // int(role_cfg.ppo_mini_batch_size)) * int(role_cfg.ppo_epochs)
        return max(1, training_steps * per_step)

    def _build_worker_groups(self) -> None:
        cfg = self.cfg
        plain = OmegaConf.to_container(cfg, resolve=True)

        def group(worker_cls, name: str, role_cfg: Any, **kwargs) -> WorkerGroup:
            pool = ResourcePool(
                name,
                num_workers=int(role_cfg.num_workers),
                cpus_per_worker=float(role_cfg.cpus_per_worker),
                gpus_per_worker=float(getattr(role_cfg, "gpus_per_worker", 0.0)),
            )
            return WorkerGroup(worker_cls, name, pool, init_kwargs={"config": plain, **kwargs})

        # The actor sits out the critic warm-up, so its LR schedule spans the remaining steps.
        warmup = min(self.total_steps, int(cfg.trainer.critic_warmup)) if self.use_critic else 0
        actor_steps = self.total_steps - warmup
        self.groups["actor"] = group(
            PolicyWorker, "actor", cfg.actor, role="actor", total_steps=self._optimizer_steps(cfg.actor, actor_steps)
        )
        if self.use_ref:
            self.groups["ref"] = group(PolicyWorker, "ref", cfg.ref, role="ref")
        if self.use_critic:
            self.groups["critic"] = group(
                CriticWorker, "critic", cfg.critic, total_steps=self._optimizer_steps(cfg.critic, self.total_steps)
            )
        self.groups["rollout"] = group(HFRolloutWorker, "rollout", cfg.rollout)
        self.groups["reward"] = group(RewardWorker, "reward", cfg.reward)

    def _log_workers(self) -> None:
        for role, wg in self.groups.items():
            infos = wg.workers_info()
            desc = ", ".join(f"rank {i['rank']} pid {i['pid']} node {str(i['node_id'])[:8]}" for i in infos)
            line = f"[rlflow] role {role}: {len(infos)} worker(s): {desc}"
            logger.info(line)
            tqdm.write(line)

    # ----------------------------------------------------------------- one step
    def step(self) -> dict[str, Any]:
        """Run one training step and return its metrics (also appended to metrics.jsonl)."""
        cfg = self.cfg
        timer = PhaseTimer()
        step_start = time.perf_counter()
        metrics: dict[str, Any] = {"step": self.global_step + 1, "epoch": self.batches.epoch}

        # Rollouts with their scores; with dynamic sampling, only groups whose rewards differ.
        batch, sampled = self._collect_batch(timer, metrics)

        if batch is not None:
            if self._needs_old_log_probs():
                with timer.phase("old_log_prob"):
                    batch["old_log_probs"] = self._log_probs("actor", batch)

            if self.use_ref:
                with timer.phase("ref"):
                    batch["ref_log_probs"] = self._log_probs("ref", batch)

            if self.use_critic:
                with timer.phase("values"):
                    batch["values"] = self.groups["critic"].call_sharded("compute_values", batch)["values"]

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
                    norm_by_std=bool(cfg.algorithm.norm_adv_by_std_in_grpo),
                    gamma=float(cfg.algorithm.gamma),
                    lam=float(cfg.algorithm.lam),
                )
                batch["advantages"], batch["returns"] = advantages, returns

            if self.use_critic:
                with timer.phase("update_critic"):
                    rank_metrics = self.groups["critic"].call_sharded_metrics(
                        "update_critic", self._critic_view(batch),
                        mini_batch_size=self._per_worker_mini_batch(cfg.critic),
                    )
                    metrics.update(rank_metrics[0])  # reduced over ranks inside the update

            # PPO's critic warm-up: the actor waits until the values mean something.
            if not self.use_critic or self.global_step >= int(cfg.trainer.critic_warmup):
                with timer.phase("update_actor"):
                    rank_metrics = self.groups["actor"].call_sharded_metrics(
                        "update_policy", self._training_view(batch),
                        mini_batch_size=self._per_worker_mini_batch(cfg.actor),
                    )
                    metrics.update(rank_metrics[0])  # identical on every rank
                with timer.phase("sync_weights"):
                    self._sync_weights()
            metrics.update(self._training_metrics(batch))

        self.global_step += 1
        metrics.update(self._rollout_metrics(sampled))
        metrics.update(timer.timings)
        step_time = time.perf_counter() - step_start
        metrics["timing/step_s"] = step_time
        num_tokens = int(sampled["attention_mask"].sum())
        metrics["throughput/tokens_per_s"] = num_tokens / step_time
        metrics["weight_version"] = self.weight_version
        self.metrics.log(metrics)
        return metrics

    # ----------------------------------------------------------------- rollouts
    def _next_prompts(self) -> BatchedDataDict:
        rows = [self.train_dataset[i] for i in self.batches.next_indices()]
        return collate_fn(rows)

    def _generate_and_score(self, timer: PhaseTimer, round_idx: int) -> BatchedDataDict:
        """One generation round: the next prompt batch, ``rollout.n`` responses each, scored."""
        cfg = self.cfg
        with timer.phase("data"):
            prompts = self._next_prompts()
            # One id per prompt: its n responses form a group (GRPO, RLOO, dynamic sampling).
            prompts["uid"] = [str(uuid.uuid4()) for _ in range(prompts.size)]
            batch = prompts.repeat_interleave(int(cfg.rollout.n))

        with timer.phase("gen"):
            generated = self.groups["rollout"].call_sharded(
                "generate", batch,
                seed=self.global_step + round_idx * _ROUND_SEED_STRIDE,
                expected_weight_version=self.weight_version,
            )
            batch.update(generated)

        with timer.phase("reward"):
            batch.update(self.groups["reward"].call_sharded("compute_reward", batch))
            ob = cfg.reward.overlong_buffer
            if ob.enable:
                penalty = overlong_penalty(
                    batch["response_mask"].sum(-1), int(cfg.data.max_response_length),
                    int(ob.len), float(ob.penalty_factor),
                )
                batch["token_level_scores"] = add_sequence_reward(
                    batch["token_level_scores"], batch["response_mask"], penalty
                )
                batch["overlong_penalty"] = penalty
        return batch

    def _collect_batch(
        self, timer: PhaseTimer, metrics: dict[str, Any]
    ) -> tuple[Optional[BatchedDataDict], BatchedDataDict]:
        """Returns ``(training batch or None, every response sampled this step)``.

        Without dynamic sampling both are the one generated batch. With it, each round keeps
        the groups whose ``filter_groups.metric`` varies; rounds continue with new prompts
        until ``data.train_batch_size`` groups are kept or ``max_num_gen_batches`` rounds
        have run. The kept groups are then trimmed to the largest count the training workers
        can split evenly (None when that is zero: no group carried a learning signal).
        """
        cfg = self.cfg
        fcfg = cfg.algorithm.filter_groups
        if not fcfg.enable:
            batch = self._generate_and_score(timer, round_idx=0)
            return batch, batch

        n = int(cfg.rollout.n)
        target = int(cfg.data.train_batch_size)
        rounds: list[BatchedDataDict] = []
        kept: list[BatchedDataDict] = []
        num_kept = 0
        while num_kept < target and len(rounds) < int(fcfg.max_num_gen_batches):
            batch = self._generate_and_score(timer, round_idx=len(rounds))
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
            return None, sampled
        merged = BatchedDataDict.from_batches(kept)
        return merged.select_indices(list(range(num_groups * n))), sampled

    def _trainable_group_count(self, available: int) -> int:
        """How many of ``available`` kept groups the trained roles can split evenly."""
        roles = [self.cfg.actor] + ([self.cfg.critic] if self.use_critic else [])
        shapes = [
            (int(r.num_workers), self._per_worker_mini_batch(r), int(r.ppo_micro_batch_size_per_worker))
            for r in roles
        ]
        return splittable_group_count(available, int(self.cfg.rollout.n), shapes)

    # ----------------------------------------------------------------- helpers
    def _per_worker_mini_batch(self, role_cfg: Any) -> int:
        return int(role_cfg.ppo_mini_batch_size) * int(self.cfg.rollout.n) // int(role_cfg.num_workers)

    def _log_probs(self, role: str, batch: BatchedDataDict) -> torch.Tensor:
        wg = self.groups[role]
        role_cfg = self.cfg.actor if role == "actor" else self.cfg.ref
        shard = -(-batch.size // wg.world_size)
        # Micro-batches must tile the shard exactly; a filtered batch can have any size.
        micro = largest_divisor_at_most(shard, int(role_cfg.log_prob_micro_batch_size_per_worker))
        return wg.call_sharded("compute_log_prob", batch, micro_batch_size=micro)["log_probs"]

    def _needs_old_log_probs(self) -> bool:
        if self.use_kl_in_reward:
            return True  # the KL penalty in the reward is measured on the sampling policy
        mode = self.cfg.actor.recompute_old_log_prob
        if mode == "always":
            return True
        if mode == "never":
            return False
        # Exactly on-policy (a single optimiser step per batch): the old log-probs equal the
        # current ones, so the update uses the detached current values and saves a forward pass.
        acfg = self.cfg.actor
        return not (int(acfg.ppo_epochs) == 1 and int(acfg.ppo_mini_batch_size) == int(self.cfg.data.train_batch_size))

    @staticmethod
    def _training_view(batch: BatchedDataDict) -> BatchedDataDict:
        keys = ["input_ids", "attention_mask", "position_ids", "responses", "response_mask", "advantages"]
        keys += [k for k in ("old_log_probs", "ref_log_probs", "returns") if k in batch]
        return BatchedDataDict({k: batch[k] for k in keys})

    @staticmethod
    def _critic_view(batch: BatchedDataDict) -> BatchedDataDict:
        keys = ["input_ids", "attention_mask", "position_ids", "responses", "response_mask", "values", "returns"]
        return BatchedDataDict({k: batch[k] for k in keys})

    def _sync_weights(self) -> None:
        refs = [r for r in self.groups["actor"].call_all("publish_weights") if r is not None]
        self.weight_version += 1
        self.groups["rollout"].call_all("update_weights", refs[0], self.weight_version)

    # ----------------------------------------------------------------- metrics
    def _rollout_metrics(self, sampled: BatchedDataDict) -> dict[str, float]:
        """What the policy did this step: every sampled response, filtered or not."""
        scores = sampled["scores"].float()
        resp_len = sampled["response_mask"].sum(-1).float()
        prompt_len = sampled["attention_mask"].sum(-1).float() - resp_len
        max_len = int(self.cfg.data.max_response_length)
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
        """Train until ``trainer.total_steps`` (or ``num_steps`` more steps); returns the metrics."""
        end = self.total_steps if num_steps is None else min(self.total_steps, self.global_step + num_steps)
        bar = tqdm(
            total=self.total_steps, initial=self.global_step, desc="rlflow", unit="step",
            disable=not self.cfg.trainer.progress_bar, dynamic_ncols=True,
        )
        try:
            while self.global_step < end:
                metrics = self.step()
                bar.update(1)
                bar.set_postfix({"reward": f"{metrics['reward/mean']:.3f}"})
                tqdm.write(MetricsLog.console_line(metrics))
        finally:
            bar.close()
        return self.metrics.history

    def close(self) -> None:
        for wg in self.groups.values():
            wg.shutdown()
        self.groups.clear()
