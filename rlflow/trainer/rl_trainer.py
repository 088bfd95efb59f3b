"""The single controller for on-policy RL (GRPO and its family).

The driver owns no model. Each step it moves one BatchedDataDict through the worker groups:

    prompts -> rollout.generate -> reward.compute_reward -> actor.compute_log_prob (old)
            -> ref.compute_log_prob -> advantages (here) -> actor.update_policy
            -> weight sync actor -> rollout -> metrics

Read ``step`` top to bottom for the whole algorithm.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from rlflow.algorithms.advantages import compute_advantages
from rlflow.data.batched_data_dict import BatchedDataDict
from rlflow.data.prompt_batches import PromptBatches
from rlflow.data.rlhf_dataset import RLHFDataset, collate_fn
from rlflow.demo.assets import resolve_demo_path
from rlflow.distributed.ray_cluster import init_ray
from rlflow.distributed.resource_pool import ResourcePool
from rlflow.distributed.worker_group import WorkerGroup
from rlflow.models.loading import load_tokenizer
from rlflow.trainer.tracking import MetricsLog, PhaseTimer
from rlflow.trainer.config_checks import check_config
from rlflow.workers.policy import PolicyWorker
from rlflow.workers.reward import RewardWorker
from rlflow.workers.rollout.hf_rollout import HFRolloutWorker

logger = logging.getLogger("rlflow")


def default_output_dir(cfg: DictConfig) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.abspath(os.path.join("outputs", cfg.trainer.experiment_name, stamp))


class RLTrainer:
    """Builds the worker groups for a config and runs GRPO-style training steps."""

    def __init__(self, cfg: DictConfig) -> None:
        check_config(cfg)
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

        init_ray(
            address=cfg.cluster.address,
            num_cpus=cfg.cluster.num_cpus,
            num_gpus=cfg.cluster.num_gpus,
            dashboard_host=cfg.cluster.dashboard_host,
            include_dashboard=cfg.cluster.include_dashboard,
            namespace=cfg.cluster.namespace,
            runtime_env={"env_vars": dict(cfg.cluster.env_vars)} if cfg.cluster.env_vars else None,
        )
        self.use_ref = bool(cfg.actor.use_kl_loss)
        self.groups: dict[str, WorkerGroup] = {}
        self._build_worker_groups()
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

    def _optimizer_steps(self) -> int:
        acfg = self.cfg.actor
        per_step = (int(self.cfg.data.train_batch_size) // int(acfg.ppo_mini_batch_size)) * int(acfg.ppo_epochs)
        return self.total_steps * per_step

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

        self.groups["actor"] = group(PolicyWorker, "actor", cfg.actor, role="actor", total_steps=self._optimizer_steps())
        if self.use_ref:
            self.groups["ref"] = group(PolicyWorker, "ref", cfg.ref, role="ref")
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
    def _next_prompts(self) -> BatchedDataDict:
        rows = [self.train_dataset[i] for i in self.batches.next_indices()]
        return collate_fn(rows)

    def step(self) -> dict[str, Any]:
        """Run one training step and return its metrics (also appended to metrics.jsonl)."""
        cfg = self.cfg
        timer = PhaseTimer()
        step_start = time.perf_counter()
        actor, rollout, reward = self.groups["actor"], self.groups["rollout"], self.groups["reward"]

        with timer.phase("data"):
            prompts = self._next_prompts()
            # One id per prompt: its n responses form a GRPO group.
            prompts["uid"] = [str(uuid.uuid4()) for _ in range(prompts.size)]
            batch = prompts.repeat_interleave(int(cfg.rollout.n))

        with timer.phase("gen"):
            generated = rollout.call_sharded(
                "generate", batch, seed=self.global_step, expected_weight_version=self.weight_version
            )
            batch.update(generated)

        with timer.phase("reward"):
            batch.update(reward.call_sharded("compute_reward", batch))

        if self._needs_old_log_probs():
            with timer.phase("old_log_prob"):
                out = actor.call_sharded(
                    "compute_log_prob", batch,
                    micro_batch_size=int(cfg.actor.log_prob_micro_batch_size_per_worker),
                )
                batch["old_log_probs"] = out["log_probs"]

        if self.use_ref:
            with timer.phase("ref"):
                out = self.groups["ref"].call_sharded(
                    "compute_log_prob", batch,
                    micro_batch_size=int(cfg.ref.log_prob_micro_batch_size_per_worker),
                )
                batch["ref_log_probs"] = out["log_probs"]

        with timer.phase("adv"):
            batch["token_level_rewards"] = batch["token_level_scores"]
            advantages, returns = compute_advantages(
                cfg.algorithm.adv_estimator,
                token_level_rewards=batch["token_level_rewards"],
                response_mask=batch["response_mask"],
                group_index=batch["uid"],
                norm_by_std=bool(cfg.algorithm.norm_adv_by_std_in_grpo),
                gamma=float(cfg.algorithm.gamma),
                lam=float(cfg.algorithm.lam),
            )
            batch["advantages"], batch["returns"] = advantages, returns

        with timer.phase("update_actor"):
            mini_per_worker = int(cfg.actor.ppo_mini_batch_size) * int(cfg.rollout.n) // int(cfg.actor.num_workers)
            rank_metrics = actor.call_sharded_metrics(
                "update_policy", self._training_view(batch), mini_batch_size=mini_per_worker
            )

        with timer.phase("sync_weights"):
            self._sync_weights()

        self.global_step += 1
        metrics: dict[str, Any] = {"step": self.global_step, "epoch": self.batches.epoch}
        metrics.update(rank_metrics[0])  # identical on every rank: reduced inside the update
        metrics.update(self._batch_metrics(batch))
        metrics.update(timer.timings)
        step_time = time.perf_counter() - step_start
        metrics["timing/step_s"] = step_time
        num_tokens = int(batch["attention_mask"].sum())
        metrics["throughput/tokens_per_s"] = num_tokens / step_time
        metrics["weight_version"] = self.weight_version
        self.metrics.log(metrics)
        return metrics

    def _needs_old_log_probs(self) -> bool:
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

    def _sync_weights(self) -> None:
        refs = [r for r in self.groups["actor"].call_all("publish_weights") if r is not None]
        self.weight_version += 1
        self.groups["rollout"].call_all("update_weights", refs[0], self.weight_version)

    def _batch_metrics(self, batch: BatchedDataDict) -> dict[str, float]:
        scores = batch["scores"].float()
        resp_len = batch["response_mask"].sum(-1).float()
        prompt_len = batch["attention_mask"].sum(-1).float() - resp_len
        max_len = int(self.cfg.data.max_response_length)
        out = {
            "reward/mean": scores.mean().item(),
            "reward/max": scores.max().item(),
            "reward/min": scores.min().item(),
            "reward/std": scores.std().item() if scores.numel() > 1 else 0.0,
            "advantages/mean": batch["advantages"][batch["response_mask"].bool()].mean().item(),
            "response_length/mean": resp_len.mean().item(),
            "response_length/max": resp_len.max().item(),
            "response_length/clip_ratio": (resp_len >= max_len).float().mean().item(),
            "prompt_length/mean": prompt_len.mean().item(),
        }
        for key in batch.keys():
            if key.startswith("reward_extra/"):
                out[f"reward/{key.split('/', 1)[1]}"] = batch[key].float().mean().item()
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
