"""The policy model as a data-parallel Ray worker: log-probs for the actor and the reference
policy, and clipped policy-gradient updates for the actor.

One class serves both roles because they run the same forward pass; the reference policy
simply has no optimiser. With more than one worker the model is sharded with FSDP2
(``fully_shard`` on each decoder layer, then the root) over gloo on CPU or NCCL on GPU.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import ray
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from rlflow.algorithms.losses import (
    aggregate_loss,
    count_tokens_and_seqs,
    kl_penalty,
    policy_loss_clipped,
    policy_loss_gspo,
)
from rlflow.data.batched_data_dict import BatchedDataDict
from rlflow.models.loading import load_causal_lm
from rlflow.optim import build_lr_scheduler, build_optimizer
from rlflow.utils.torch_functional import entropy_from_logits, logprobs_from_logits
from rlflow.workers.base import Worker


class PolicyWorker(Worker):
    def __init__(self, config: dict, role: str, total_steps: int = 1) -> None:
        super().__init__()
        self.cfg = OmegaConf.create(config)
        self.role = role
        self.trainable = role == "actor"
        role_cfg = self.cfg.actor if self.trainable else self.cfg.ref
        torch.set_num_threads(max(1, int(role_cfg.torch_threads)))
        self.init_distributed()
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        # Same seed on every rank so unsharded initial state (if any) agrees before sharding.
        torch.manual_seed(int(self.cfg.trainer.seed))

        model = load_causal_lm(self.cfg.model, device=self.device)
        if self.cfg.model.gradient_checkpointing and self.trainable:
            model.gradient_checkpointing_enable()
        if not self.trainable:
            model.requires_grad_(False)
            model.eval()
        self.model = self._shard(model) if self.world_size > 1 else model
        self.temperature = float(self.cfg.rollout.temperature) or 1.0

        self.optimizer = None
        self.lr_scheduler = None
        if self.trainable:
            self.model.train()
            self.optimizer = build_optimizer(self.model.parameters(), self.cfg.actor.optim)
            self.lr_scheduler = build_lr_scheduler(self.optimizer, self.cfg.actor.optim, total_steps)
        self.global_step = 0

    def _shard(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import fully_shard

        layers = getattr(getattr(model, "model", model), "layers", None)
        if layers is None:
            raise ValueError(
                f"cannot find the decoder layers of {type(model).__name__} for FSDP2 sharding: "
                f"the model must expose model.layers (Llama, Qwen2, Mistral, Gemma ... do)"
            )
        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
        return model

    # ----------------------------------------------------------------- forward passes
    def _forward(self, mb: BatchedDataDict, with_entropy: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        responses = mb["responses"].to(self.device)
        response_len = responses.shape[1]
        logits = self.model(
            input_ids=mb["input_ids"].to(self.device),
            attention_mask=mb["attention_mask"].to(self.device),
            position_ids=mb["position_ids"].to(self.device),
            use_cache=False,
        ).logits
        # Logits at position t predict token t+1, so the response tokens are scored by the
        # logits one step to their left.
        logits = logits[:, -response_len - 1 : -1, :].float() / self.temperature
        log_probs = logprobs_from_logits(logits, responses)
        entropy = entropy_from_logits(logits) if with_entropy else None
        return log_probs, entropy

    @torch.no_grad()
    def compute_log_prob(self, batch: BatchedDataDict, micro_batch_size: int) -> BatchedDataDict:
        """Per-token log-probs (and entropy) of ``responses`` under the current weights."""
        self.model.eval()
        out_lp, out_ent = [], []
        for mb in self._microbatches(batch, micro_batch_size):
            lp, ent = self._forward(mb, with_entropy=True)
            out_lp.append(lp.cpu())
            out_ent.append(ent.cpu())
        if self.trainable:
            self.model.train()
        return BatchedDataDict({"log_probs": torch.cat(out_lp), "entropy": torch.cat(out_ent)})

    def _microbatches(self, batch: BatchedDataDict, micro_batch_size: int):
        # FSDP needs every rank to run the same number of forward passes; the WorkerGroup pads
        # shards to equal sizes, so equal micro-batch sizes give equal counts.
        return batch.make_microbatch_iterator(max(1, min(micro_batch_size, batch.size)))

    # ----------------------------------------------------------------- update
    def update_policy(self, batch: BatchedDataDict, mini_batch_size: int) -> dict[str, float]:
        """PPO-style update on this rank's shard.

        ``mini_batch_size`` is per rank: one optimiser step per mini-batch. Each micro-batch loss
        is its share of the mini-batch loss over ALL ranks (global token / sequence counts), so
        the accumulated gradient does not depend on the micro-batch size or the number of ranks.
        """
        acfg = self.cfg.actor
        self.model.train()
        sums: dict[str, float] = {}
        num_updates = 0
        for _epoch in range(int(acfg.ppo_epochs)):
            order = torch.arange(batch.size)
            if acfg.shuffle_mini_batches:
                gen = torch.Generator().manual_seed(int(self.cfg.trainer.seed) * 100003 + self.global_step)
                order = torch.randperm(batch.size, generator=gen)
            shuffled = batch.select_indices(order.tolist())
            for start in range(0, batch.size, mini_batch_size):
                mini = shuffled.slice(start, min(start + mini_batch_size, batch.size))
                stats = self._update_one_mini_batch(mini)
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + value
                num_updates += 1
        self.global_step += 1
        metrics = {f"actor/{k}": v / max(num_updates, 1) for k, v in sums.items()}
        metrics["actor/lr"] = self.optimizer.param_groups[0]["lr"]
        metrics["actor/num_updates"] = float(num_updates)
        return metrics

    def _global_counts(self, mini: BatchedDataDict) -> tuple[float, float]:
        num_tokens, num_seqs = count_tokens_and_seqs(mini["response_mask"])
        counts = torch.tensor([float(num_tokens), float(num_seqs)], dtype=torch.float64)
        if self.world_size > 1:
            dist.all_reduce(counts)
        return counts[0].item(), counts[1].item()

    def _update_one_mini_batch(self, mini: BatchedDataDict) -> dict[str, float]:
        acfg = self.cfg.actor
        num_tokens, num_seqs = self._global_counts(mini)
        norm = dict(
            global_num_tokens=num_tokens,
            global_num_seqs=num_seqs,
            norm_length=int(self.cfg.data.max_response_length),
        )
        stats = torch.zeros(6, dtype=torch.float64)  # pg_loss, entropy, kl, clipfrac, ppo_kl, loss
        self.optimizer.zero_grad(set_to_none=True)
        for mb in self._microbatches(mini, int(acfg.ppo_micro_batch_size_per_worker)):
            mask = mb["response_mask"].to(self.device).float()
            log_probs, entropy = self._forward(mb, with_entropy=True)
            old = mb["old_log_probs"].to(self.device) if "old_log_probs" in mb else log_probs.detach()
            adv = mb["advantages"].to(self.device)
            clip = dict(clip_ratio_low=acfg.clip_ratio_low, clip_ratio_high=acfg.clip_ratio_high)
            if acfg.policy_loss == "gspo":
                pg_loss, pg_stats = policy_loss_gspo(
                    log_probs, old, adv, mask, loss_agg_mode=acfg.loss_agg_mode, **clip, **norm
                )
            else:
                pg_loss, pg_stats = policy_loss_clipped(
                    log_probs, old, adv, mask, clip_ratio_c=acfg.clip_ratio_c,
                    loss_agg_mode=acfg.loss_agg_mode, **clip, **norm,
                )
            entropy_share = aggregate_loss(entropy, mask, acfg.loss_agg_mode, **norm)
            loss = pg_loss - float(acfg.entropy_coeff) * entropy_share
            kl_share = torch.zeros(())
            if acfg.use_kl_loss:
                kl = kl_penalty(log_probs, mb["ref_log_probs"].to(self.device), acfg.kl_loss_type)
                kl_share = aggregate_loss(kl, mask, acfg.loss_agg_mode, **norm)
                loss = loss + float(acfg.kl_loss_coef) * kl_share
            # FSDP averages gradients over ranks; the loss is already a share of the global
            # mean, so undo that averaging.
            (loss * self.world_size).backward()
            token_share = float(mask.sum()) / max(num_tokens, 1.0)
            stats += torch.tensor([
                pg_loss.item(), entropy_share.item(), kl_share.detach().item(),
                float(pg_stats["pg_clipfrac"]) * token_share,
                float(pg_stats["ppo_kl"]) * token_share,
                loss.item(),
            ], dtype=torch.float64)
        grad_norm = self._clip_grad_norm(float(acfg.optim.grad_clip))
        skipped = not math.isfinite(grad_norm)
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
        self.lr_scheduler.step()
        if self.world_size > 1:
            dist.all_reduce(stats)
        names = ("pg_loss", "entropy", "kl", "pg_clipfrac", "ppo_kl", "loss")
        out = {name: stats[i].item() for i, name in enumerate(names)}
        out["grad_norm"] = grad_norm
        out["skipped_updates"] = float(skipped)
        return out

    def _clip_grad_norm(self, max_norm: float) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    # ----------------------------------------------------------------- weights
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded CPU state dict; a collective, so every rank must call it."""
        if self.world_size > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(
                self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def publish_weights(self) -> Optional[list]:
        """Put the full weights in the Ray object store; rank 0 returns ``[ref]``, others None.

        The reference is wrapped in a list so Ray hands it over as a reference instead of
        fetching the tensors into the driver.
        """
        state = self.full_state_dict()
        if self.rank != 0:
            return None
        return [ray.put(state)]
