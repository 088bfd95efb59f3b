"""The single controller for DPO: offline preference pairs, an actor and a frozen reference.

Each step:

    pairs (PreferenceDataset) -> collate_preference (2B rows: chosen, rejected, ...)
        -> ref.compute_sequence_log_probs -> actor.update_dpo (one optimiser step) -> metrics

There is no rollout, reward or weight sync: the data is fixed. Held-out pairs
(``data.val_files``) are scored before training (``trainer.val_before_train``), every
``trainer.test_freq`` steps and at the end of ``fit``:

* ``val/dpo/accuracy``: share of pairs whose implicit reward ``beta * (log pi - log ref)`` is
  higher for the chosen answer (exactly 0 before training, when pi = ref);
* ``val/preference_accuracy``: share of pairs where the policy itself gives the chosen answer
  a higher log-prob than the rejected one (about chance before training);
* ``val/chosen_prob`` / ``val/rejected_prob``: mean probability of the whole answer;
* ``val/dpo/margin``, ``val/dpo/loss``.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from rlflow.algorithms.losses import dpo_loss
from rlflow.config.schema import typed_config
from rlflow.data.batched_data_dict import BatchedDataDict
from rlflow.data.preference_dataset import PreferenceDataset, collate_preference
from rlflow.data.prompt_batches import PromptBatches
from rlflow.distributed.worker_group import WorkerGroup
from rlflow.errors import ConfigError
from rlflow.models.architecture import check_model_support
from rlflow.models.loading import load_tokenizer
from rlflow.models.lora import lora_enabled
from rlflow.trainer.config_checks import check_config
from rlflow.trainer.preflight import preflight
from rlflow.trainer.startup import (
    build_pool, init_ray_from_config, log_workers, prepare_output_dir, total_training_steps, wait_ready,
)
from rlflow.trainer.tracking import MetricsLog, PhaseTimer
from rlflow.workers.dpo_policy import DPOPolicyWorker


class DPOTrainer:
    """Builds the actor and ref groups for a DPO config and runs DPO steps."""

    def __init__(self, cfg: DictConfig) -> None:
        check_config(cfg)
        check_model_support(cfg)
        if cfg.trainer.algorithm != "dpo":
            raise ConfigError(
                f"DPOTrainer runs trainer.algorithm=dpo, got '{cfg.trainer.algorithm}': use "
                "rlflow.build_trainer(cfg), which picks the trainer for the algorithm"
            )
        self.cfg = cfg
        torch.manual_seed(cfg.trainer.seed)

        # Everything that reads the user's files runs here, before Ray and the workers start.
        self.tokenizer = preflight(cfg)
        self.train_dataset = self._dataset(cfg.data.train_files)
        self.val_dataset = self._dataset(cfg.data.val_files) if cfg.data.val_files else None
        self.batches = PromptBatches(
            len(self.train_dataset), cfg.data.train_batch_size, cfg.data.shuffle, cfg.data.seed
        )
        self.total_steps = total_training_steps(cfg.trainer, self.batches.batches_per_epoch)
        self.global_step = 0
        # With LoRA the reference policy is the actor's own frozen base (adapters off); with
        # ref.in_actor a frozen copy in the actor's workers. Either way no ref workers start.
        self.ref_in_actor = lora_enabled(cfg.actor.lora) or cfg.ref.in_actor
        self._val_ref_logps: Optional[torch.Tensor] = None

        self.groups: dict[str, WorkerGroup] = {}
        self.output_dir, self._run_lock = prepare_output_dir(cfg)
        try:
            self.metrics = MetricsLog(self.output_dir)
            init_ray_from_config(cfg.cluster)
            self._build_worker_groups()
        except BaseException:
            self.close()
            raise
        log_workers(self.groups)

    # ----------------------------------------------------------------- set-up
    def _dataset(self, files: Any) -> PreferenceDataset:
        dcfg = self.cfg.data
        return PreferenceDataset(
            list(files),
            self.tokenizer,
            prompt_key=dcfg.prompt_key,
            chosen_key=self.cfg.dpo.chosen_key,
            rejected_key=self.cfg.dpo.rejected_key,
            max_length=dcfg.max_prompt_length + dcfg.max_response_length,
            max_prompt_length=dcfg.max_prompt_length,
            apply_chat_template_kwargs=OmegaConf.to_container(dcfg.apply_chat_template_kwargs),
        )

    def _build_worker_groups(self) -> None:
        cfg = self.cfg
        typed = typed_config(cfg)
        roles = [("actor", cfg.actor, {"role": "actor", "total_steps": self.total_steps,
                                       "with_reference": self.ref_in_actor})]
        if not self.ref_in_actor:
            roles.append(("ref", cfg.ref, {"role": "ref"}))
        for role, role_cfg, kwargs in roles:
            pool = build_pool(role, role_cfg)
            self.groups[role] = WorkerGroup(
                DPOPolicyWorker, role, pool, init_kwargs={"config": typed, **kwargs}, wait=False
            )
        wait_ready(self.groups)

    def _collate(self, indices: list[int], dataset: PreferenceDataset) -> BatchedDataDict:
        return collate_preference([dataset[i] for i in indices], dataset.pad_token_id)

    def _sequence_log_probs(self, role: str, batch: BatchedDataDict) -> torch.Tensor:
        flag = {"reference": True} if role == "ref" and self.ref_in_actor else {}
        if flag:
            role = "actor"  # the actor's workers score the reference policy
        role_cfg = self.cfg.actor if role == "actor" else self.cfg.ref
        out = self.groups[role].call_sharded(
            "compute_sequence_log_probs", batch,
            micro_batch_size=role_cfg.log_prob_micro_batch_size_per_worker, **flag,
        )
        return out["logps"]

    # ----------------------------------------------------------------- one step
    def step(self) -> dict[str, Any]:
        """One DPO optimiser step on the next batch of pairs; returns its metrics."""
        cfg = self.cfg
        timer = PhaseTimer()
        step_start = time.perf_counter()
        with timer.phase("data"):
            batch = self._collate(self.batches.next_indices(), self.train_dataset)
        with timer.phase("ref"):
            batch["ref_logps"] = self._sequence_log_probs("ref", batch)
        with timer.phase("update_actor"):
            rank_metrics = self.groups["actor"].call_sharded_metrics(
                "update_dpo", batch, micro_batch_size=cfg.actor.ppo_micro_batch_size_per_worker
            )
        self.global_step += 1
        metrics: dict[str, Any] = {"step": self.global_step, "epoch": self.batches.epoch}
        metrics.update(rank_metrics[0])  # reduced over ranks inside the update
        freq = cfg.trainer.test_freq
        if self.val_dataset is not None and (
            (freq > 0 and self.global_step % freq == 0) or self.global_step == self.total_steps
        ):
            with timer.phase("validate"):
                metrics.update(self.validate())
        metrics.update(timer.timings)
        step_time = time.perf_counter() - step_start
        metrics["timing/step_s"] = step_time
        metrics["throughput/tokens_per_s"] = int(batch["attention_mask"].sum()) / step_time
        self.metrics.log(metrics)
        return metrics

    # ----------------------------------------------------------------- validation
    def validate(self) -> dict[str, float]:
        """Preference metrics of the current policy on ``data.val_files`` (see module doc)."""
        if self.val_dataset is None:
            raise ConfigError("validation needs preference pairs: set data.val_files")
        size = len(self.val_dataset)
        chunk = int(self.cfg.data.val_batch_size or size)
        batches = [
            self._collate(list(range(start, min(start + chunk, size))), self.val_dataset)
            for start in range(0, size, chunk)
        ]
        if self._val_ref_logps is None:  # the reference is frozen: score it once
            self._val_ref_logps = torch.cat([self._sequence_log_probs("ref", b) for b in batches])
        policy = torch.cat([self._sequence_log_probs("actor", b) for b in batches]).view(-1, 2)
        ref = self._val_ref_logps.view(-1, 2)
        dcfg = self.cfg.dpo
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1],
            beta=dcfg.beta, loss_type=dcfg.loss_type, label_smoothing=dcfg.label_smoothing,
        )
        return {
            "val/dpo/loss": losses.mean().item(),
            "val/dpo/accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
            "val/dpo/margin": (chosen_rewards - rejected_rewards).mean().item(),
            "val/preference_accuracy": (policy[:, 0] > policy[:, 1]).float().mean().item(),
            "val/chosen_logps": policy[:, 0].mean().item(),
            "val/chosen_prob": policy[:, 0].exp().mean().item(),
            "val/rejected_prob": policy[:, 1].exp().mean().item(),
        }

    # ----------------------------------------------------------------- loop
    def fit(self, num_steps: Optional[int] = None) -> list[dict[str, Any]]:
        """Train until ``trainer.total_steps`` (or ``num_steps`` more steps); returns the metrics.

        With validation data and ``trainer.val_before_train``, a first row ``{"step": 0,
        "val/...": ...}`` records the starting point.
        """
        if self.global_step == 0 and self.val_dataset is not None and self.cfg.trainer.val_before_train:
            self.metrics.log({"step": 0, **self.validate()})
        end = self.total_steps if num_steps is None else min(self.total_steps, self.global_step + num_steps)
        bar = tqdm(
            total=self.total_steps, initial=self.global_step, desc="rlflow dpo", unit="step",
            disable=not self.cfg.trainer.progress_bar, dynamic_ncols=True,
        )
        try:
            while self.global_step < end:
                metrics = self.step()
                bar.update(1)
                bar.set_postfix({"loss": f"{metrics['dpo/loss']:.3f}", "acc": f"{metrics['dpo/accuracy']:.2f}"})
                tqdm.write(self.console_line(metrics))
        finally:
            bar.close()
        return self.metrics.history

    @staticmethod
    def console_line(metrics: dict[str, Any]) -> str:
        parts = [f"step {metrics.get('step')}"]
        for key, short in (
            ("dpo/loss", "loss"), ("dpo/accuracy", "acc"), ("dpo/margin", "margin"),
            ("val/preference_accuracy", "val_pref_acc"), ("val/dpo/accuracy", "val_acc"),
            ("timing/step_s", "step_s"),
        ):
            if metrics.get(key) is not None:
                parts.append(f"{short} {metrics[key]:.4g}")
        return " | ".join(parts)

    def close(self) -> None:
        for wg in self.groups.values():
            wg.shutdown()
        self.groups.clear()
        self._run_lock.release()
