"""PPO's critic as a data-parallel Ray worker: a value head on a causal LM's backbone.

The value model is the transformer backbone of ``critic.model_path`` (default ``model.path``;
loaded with ``AutoModel``, i.e. the causal LM without its LM head) followed by
``Linear(hidden_size, 1)``. The head starts at zero, so every value is 0 before training and
the first updates move only the head; initialising it at random would hand GAE arbitrary
baselines in the first steps.

With more than one worker the backbone is sharded with FSDP2 (each decoder layer, then the
root), like the actor.

Contracts:

* ``compute_values(batch)`` -> ``values`` ``(B, T_resp)``: ``values[:, t]`` is the value of
  the state *before* response token ``t`` (prompt plus response tokens ``< t``), read from
  the hidden state at the position of the token that precedes it. Masked positions are 0.
* ``update_critic(batch)`` minimises ``value_loss_clipped(values, old values, returns)``.
  Each micro-batch loss is its share of the mini-batch loss over all ranks (global token /
  sequence counts), so the gradient does not depend on micro-batch or data-parallel size.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.distributed as dist
from transformers import AutoModel

from rlflow.config.schema import typed_config
from rlflow.algorithms.losses import value_loss_clipped
from rlflow.data.batched_data_dict import BatchedDataDict
from rlflow.models.loading import load_pretrained, resolve_model_path
from rlflow.optim import build_lr_scheduler, build_optimizer
from rlflow.utils.torch_functional import masked_mean
from rlflow.workers.base import Worker
from rlflow.workers.fsdp import clip_and_step, global_token_and_seq_counts, shard_decoder_layers


class ValueModel(torch.nn.Module):
    """``backbone`` (a transformer returning ``last_hidden_state``) + ``Linear(hidden, 1)``."""

    def __init__(self, backbone: torch.nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        dtype = next(backbone.parameters()).dtype
        # Same dtype as the backbone: FSDP2 groups the head with the root's parameters.
        self.value_head = torch.nn.Linear(hidden_size, 1, dtype=dtype)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Per-position values ``(B, L)`` in float32."""
        hidden = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state
        return self.value_head(hidden).squeeze(-1).float()


def load_value_model(model_cfg: Any, path: str, device: torch.device | str = "cpu") -> ValueModel:
    """Backbone of the HF checkpoint at ``path`` (a causal LM folder is fine) with a zero head."""
    backbone = load_pretrained(model_cfg, resolve_model_path(path), device, AutoModel)
    hidden_size = getattr(backbone.config, "hidden_size", None)
    if hidden_size is None:
        raise ValueError(
            f"critic model at '{path}' has no config.hidden_size; point critic.model_path at a "
            "decoder-only transformer (Llama, Qwen2, Mistral ...)"
        )
    return ValueModel(backbone, int(hidden_size)).to(device)


class CriticWorker(Worker):
    def __init__(self, config: dict, total_steps: int = 1) -> None:
        super().__init__()
        self.cfg = typed_config(config)
        ccfg = self.cfg.critic
        torch.set_num_threads(max(1, ccfg.torch_threads))
        self.init_distributed()
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
        torch.manual_seed(self.cfg.trainer.seed)
        model = load_value_model(self.cfg.model, ccfg.model_path or self.cfg.model.path, self.device)
        if self.cfg.model.gradient_checkpointing:
            model.backbone.gradient_checkpointing_enable()
        if self.world_size > 1:
            model = shard_decoder_layers(model, "critic.num_workers=1")
        self.model = model
        self.model.train()
        self.optimizer = build_optimizer(self.model.parameters(), ccfg.optim)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, ccfg.optim, total_steps)
        self.global_step = 0

    # ----------------------------------------------------------------- forward
    def _values(self, mb: BatchedDataDict) -> torch.Tensor:
        """Values of the states before each response token, ``(b, T_resp)`` float32."""
        response_len = mb["responses"].shape[1]
        values = self.model(
            input_ids=mb["input_ids"].to(self.device),
            attention_mask=mb["attention_mask"].to(self.device),
            position_ids=mb["position_ids"].to(self.device),
        )
        # The hidden state at position p has read tokens <= p: the state before token p + 1.
        return values[:, -response_len - 1 : -1]

    @staticmethod
    def _microbatches(batch: BatchedDataDict, size: int) -> Iterator[BatchedDataDict]:
        # Slices of at most `size` rows; the last one may be shorter. Ranks hold equal shards,
        # so they run the same number of forward passes (FSDP needs that).
        size = max(1, int(size))
        for start in range(0, batch.size, size):
            yield batch.slice(start, min(start + size, batch.size))

    @torch.no_grad()
    def compute_values(self, batch: BatchedDataDict, micro_batch_size: int | None = None) -> BatchedDataDict:
        """``{"values": (B, T_resp)}`` for ``input_ids`` / ``attention_mask`` / ``position_ids``
        / ``responses`` / ``response_mask``; zeros at masked positions."""
        size = micro_batch_size or self.cfg.critic.forward_micro_batch_size_per_worker
        self.model.eval()
        out = []
        for mb in self._microbatches(batch, size):
            values = self._values(mb)
            mask = mb["response_mask"].to(self.device)
            out.append(torch.where(mask != 0, values, torch.zeros_like(values)).cpu())
        return BatchedDataDict({"values": torch.cat(out)})

    # ----------------------------------------------------------------- update
    def update_critic(self, batch: BatchedDataDict, mini_batch_size: int) -> dict[str, float]:
        """Clipped value regression on this rank's shard; needs ``values`` (the rollout-time
        values) and ``returns``. ``mini_batch_size`` is per rank: one optimiser step each.

        Returns metrics averaged over the optimiser steps (identical on every rank):
        ``critic/vf_loss``, ``critic/vf_clipfrac``, ``critic/vpred_mean``,
        ``critic/grad_norm``, ``critic/lr``, ``critic/num_updates``.
        """
        ccfg = self.cfg.critic
        self.model.train()
        sums: dict[str, float] = {}
        num_updates = 0
        for _epoch in range(ccfg.ppo_epochs):
            order = list(range(batch.size))
            if ccfg.shuffle_mini_batches:
                gen = torch.Generator().manual_seed(self.cfg.trainer.seed * 100019 + self.global_step)
                order = torch.randperm(batch.size, generator=gen).tolist()
            shuffled = batch.select_indices(order)
            for start in range(0, batch.size, mini_batch_size):
                mini = shuffled.slice(start, min(start + mini_batch_size, batch.size))
                for key, value in self._update_one_mini_batch(mini).items():
                    sums[key] = sums.get(key, 0.0) + value
                num_updates += 1
        self.global_step += 1
        metrics = {f"critic/{k}": v / max(num_updates, 1) for k, v in sums.items()}
        metrics["critic/lr"] = self.optimizer.param_groups[0]["lr"]
        metrics["critic/num_updates"] = float(num_updates)
        return metrics

    def _update_one_mini_batch(self, mini: BatchedDataDict) -> dict[str, float]:
        ccfg = self.cfg.critic
        num_tokens, num_seqs = global_token_and_seq_counts(mini["response_mask"], self.world_size)
        norm = dict(
            global_num_tokens=num_tokens,
            global_num_seqs=num_seqs,
            norm_length=self.cfg.data.max_response_length,
        )
        stats = torch.zeros(3, dtype=torch.float64)  # vf_loss, vf_clipfrac, vpred_mean
        self.optimizer.zero_grad(set_to_none=True)
        for mb in self._microbatches(mini, ccfg.ppo_micro_batch_size_per_worker):
            mask = mb["response_mask"].to(self.device)
            values = self._values(mb)
            loss, loss_stats = value_loss_clipped(
                values,
                mb["values"].to(self.device).float(),
                mb["returns"].to(self.device).float(),
                mask,
                cliprange_value=ccfg.cliprange_value,
                loss_agg_mode=ccfg.loss_agg_mode,
                **norm,
            )
            # FSDP averages gradients over ranks; the loss is already this rank's share of the
            # global loss, so undo the averaging.
            (loss * self.world_size).backward()
            token_share = float(mask.sum()) / max(num_tokens, 1.0)
            stats += torch.tensor(
                [
                    loss.item(),
                    loss_stats["vf_clipfrac"] * token_share,
                    masked_mean(values.detach(), mask).item() * token_share,
                ],
                dtype=torch.float64,
            )
        grad_norm, skipped = clip_and_step(
            self.model, self.optimizer, self.lr_scheduler, ccfg.optim.grad_clip
        )
        if self.world_size > 1:
            dist.all_reduce(stats)
        return {
            "vf_loss": stats[0].item(),
            "vf_clipfrac": stats[1].item(),
            "vpred_mean": stats[2].item(),
            "grad_norm": grad_norm,
            "skipped_updates": float(skipped),
        }
