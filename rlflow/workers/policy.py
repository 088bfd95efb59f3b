"""The policy model as a data-parallel Ray worker: log-probs for the actor and the reference
policy, and clipped policy-gradient updates for the actor.

One class serves both roles because they run the same forward pass; the reference policy
simply has no optimiser. With more than one worker the model is sharded with FSDP2
(``fully_shard`` on each decoder layer, then the root) over gloo on CPU or NCCL on GPU.

Each rank splits its own shard into micro-batches in one of three ways (role config keys):
fixed-size micro-batches of padded rows (default), dynamic batching (``use_dynamic_bsz``:
rows of similar length, padding removed, at most ``max_tokens_per_microbatch`` tokens each)
or sequence packing (``use_sequence_packing``: rows bin-packed under the same cap, each bin
one packed row). The forward layouts live in ``rlflow.models.packing``. Whatever the split,
every rank runs the same number of forward/backward steps, and every micro-batch loss is
divided by the mini-batch's global token / sequence counts, so the gradient is the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import torch
import torch.distributed as dist

from rlflow.config.schema import typed_config
from rlflow.algorithms.losses import (
    aggregate_loss,
    kl_penalty,
    policy_loss_clipped,
    policy_loss_gspo,
)
from rlflow.algorithms.off_policy import correction_weights
from rlflow.data.batch_sizes import balanced_halves, round_up, split_to_count
from rlflow.data.batched_data_dict import BatchedDataDict
from rlflow.distributed.state_transport import put_state
from rlflow.models.loading import load_causal_lm
from rlflow.models.lora import adapters_disabled, add_lora_adapters, lora_enabled, lora_sync_state
from rlflow.models.packing import (
    build_model_inputs,
    enable_varlen_sdpa,
    mask_kind_for,
    score_responses,
    sliding_window_layout,
)
from rlflow.optim import build_lr_scheduler, build_optimizer
from rlflow.workers.base import Worker
from rlflow.workers.checkpointing import full_model_state
from rlflow.workers.fsdp import clip_and_step, global_token_and_seq_counts, shard_decoder_layers


class PolicyWorker(Worker):
    def __init__(self, config: dict, role: str, total_steps: int = 1, with_reference: bool = False) -> None:
        """``with_reference``: the actor also scores the reference policy (``ref.in_actor``);
        with LoRA that is its own base with the adapters off, otherwise a frozen copy."""
        super().__init__()
        self.cfg = typed_config(config)
        self.role = role
        self.trainable = role == "actor"
        torch.set_num_threads(max(1, self._role_cfg().torch_threads))
        self.init_distributed()
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        # Same seed on every rank so unsharded initial state (if any) agrees before sharding.
        torch.manual_seed(self.cfg.trainer.seed)

        model = load_causal_lm(self.cfg.model, device=self.device)
        # ref.in_actor: a frozen copy of the initial weights, sharded like the actor.
        self.reference = None
        if self.trainable and with_reference and not lora_enabled(self.cfg.actor.lora):
            self.reference = self._frozen(load_causal_lm(self.cfg.model, device=self.device))
        if self.cfg.model.gradient_checkpointing and self.trainable:
            model.gradient_checkpointing_enable()
        # LoRA: frozen base + trainable adapters; the base with adapters off is the reference.
        self.lora = self.trainable and lora_enabled(self.cfg.actor.lora)
        if self.lora:
            model = add_lora_adapters(model, self.cfg.actor.lora)
        if not self.trainable:
            model.requires_grad_(False)
            model.eval()
        self._prepare_attention(model)
        if self.world_size > 1:
            model = shard_decoder_layers(model, f"{role}.num_workers=1")
        self.model = model
        self.temperature = self.cfg.rollout.temperature or 1.0

        self.optimizer = None
        self.lr_scheduler = None
        if self.trainable:
            self.model.train()
            self.optimizer = build_optimizer(self.model.parameters(), self.cfg.actor.optim)
            self.lr_scheduler = build_lr_scheduler(self.optimizer, self.cfg.actor.optim, total_steps)
        self.global_step = 0
        # rollout.placement=in_actor: this worker also samples, with the very model it trains,
        # so no rollout process starts and a weight sync moves no tensors.
        self.rollout = None
        if self.trainable and self.cfg.rollout.placement == "in_actor":
            from rlflow.workers.rollout.hf_rollout import HFRolloutWorker

            self.rollout = HFRolloutWorker(config, model=self.model)

    def _prepare_attention(self, model: torch.nn.Module) -> None:
        # Packed rows: per-sequence attention where the model runs sdpa (unpacked inputs keep
        # sdpa as is), otherwise a block-diagonal mask in the form the attention kernel takes.
        enable_varlen_sdpa(model)
        self.mask_kind = mask_kind_for(model)
        self.sliding_window, self.per_layer_type_masks = sliding_window_layout(model.config)
        self.param_dtype = next(model.parameters()).dtype

    def _frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        model.requires_grad_(False)
        model.eval()
        self._prepare_attention(model)
        return shard_decoder_layers(model, "actor.num_workers=1") if self.world_size > 1 else model

    @contextmanager
    def _reference_policy(self) -> Iterator[None]:
        """Score with the reference policy inside this block: the frozen copy, or the LoRA
        base with the adapters off."""
        if self.reference is None:
            with adapters_disabled(self.model):
                yield
            return
        model, self.model = self.model, self.reference
        try:
            yield
        finally:
            self.model = model

    # ----------------------------------------------------------------- micro-batching
    def _role_cfg(self) -> Any:
        return self.cfg.actor if self.trainable else self.cfg.ref

    def _layout(self) -> str:
        """``padded`` (fixed-size micro-batches), ``unpadded`` (dynamic batching) or ``packed``."""
        rcfg = self._role_cfg()
        dynamic, packing = rcfg.use_dynamic_bsz, rcfg.use_sequence_packing
        if dynamic and packing:
            raise ValueError(
                f"{self.role}.use_dynamic_bsz and {self.role}.use_sequence_packing are both true: "
                f"turn one of them off"
            )
        return "packed" if packing else "unpadded" if dynamic else "padded"

    def plan_micro_batches(
        self, batch: BatchedDataDict, micro_batch_size: int
    ) -> tuple[str, list[list[int]]]:
        """Split this rank's rows into micro-batches; returns (layout, row indices per step).

        ``micro_batch_size`` (rows) applies to the padded layout only; dynamic batching and
        packing cap each step at ``max_tokens_per_microbatch`` tokens instead. Every rank
        returns the same number of steps (FSDP collectives run once per forward and backward,
        so the counts must line up): ranks agree on the largest count with one all-reduce,
        which makes this a collective, and the others halve their heaviest micro-batches, or
        add empty steps when they run out of rows.
        """
        layout = self._layout()
        rcfg = self._role_cfg()
        size = batch.size
        lengths = [int(n) for n in batch["attention_mask"].sum(-1).tolist()]
        round_to = rcfg.sequence_length_round if layout == "unpadded" else 1
        if layout == "padded" or size == 0:
            step = max(1, int(micro_batch_size))
            groups = [list(range(s, min(s + step, size))) for s in range(0, size, step)]
        else:
            groups = self._token_capped_groups(batch, lengths, layout, round_to)
        count = self._agree_on_count(len(groups))
        return layout, _split_to_count(groups, count, lengths, layout, round_to)

    def _token_capped_groups(
        self, batch: BatchedDataDict, lengths: list[int], layout: str, round_to: int
    ) -> list[list[int]]:
        rcfg = self._role_cfg()
        cap = rcfg.max_tokens_per_microbatch
        longest = round_up(max(max(lengths), 1), round_to)
        if longest > cap:
            raise ValueError(
                f"{self.role}.max_tokens_per_microbatch={cap} is below the longest sequence in the "
                f"batch ({longest} tokens after rounding): raise it to at least {longest}"
            )
        # The plan only needs lengths and the row width, so plan on a two-key view instead of
        # reordering every tensor of the batch.
        view = BatchedDataDict(
            {"attention_mask": batch["attention_mask"], "seq_lens": torch.tensor(lengths)}
        )
        common = dict(max_tokens_per_microbatch=cap, input_key="attention_mask", input_lengths_key="seq_lens")
        if layout == "unpadded":
            shards, order = view.shard_by_batch_size(
                1, dynamic_batching_args=dict(common, sequence_length_round=round_to)
            )
        else:
            shards, order = view.shard_by_batch_size(
                1, sequence_packing_args=dict(common, algorithm=rcfg.packing_algorithm)
            )
        return [[order[p] for p in range(a, b)] for a, b in shards[0].micro_batch_indices[0]]

    def _agree_on_count(self, count: int) -> int:
        if self.world_size == 1:
            return count
        agreed = torch.tensor([count], dtype=torch.long)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        return int(agreed.item())

    # ----------------------------------------------------------------- forward passes
    def _forward(
        self, mb: BatchedDataDict, layout: str, with_entropy: bool
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Log-probs (and entropy) of ``mb``'s response tokens, ``[b, T_resp]``, 0 where unscored."""
        inputs = build_model_inputs(
            mb["input_ids"].to(self.device),
            mb["attention_mask"].to(self.device),
            mb["position_ids"].to(self.device),
            mb["responses"].to(self.device),
            layout,
            round_to=int(self._role_cfg().sequence_length_round) if layout == "unpadded" else 1,
            mask_kind=self.mask_kind,
            mask_dtype=self.param_dtype,
            sliding_window=self.sliding_window,
            per_layer_type=self.per_layer_type_masks,
        )
        return score_responses(self.model, inputs, self.temperature, with_entropy)

    def _idle_step(self, backward: bool) -> None:
        """A forward (and backward) on one token that changes nothing: this rank has no rows
        left for this step, but FSDP's all-gathers and reduce-scatters must still line up."""
        ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        logits = self.model(input_ids=ids, use_cache=False).logits
        if backward:
            (logits.float().sum() * 0.0).backward()

    @torch.no_grad()
    def compute_log_prob(
        self,
        batch: BatchedDataDict,
        micro_batch_size: int,
        reference: bool = False,
        with_entropy: bool = False,
    ) -> BatchedDataDict:
        """Per-token log-probs (and, if asked, entropy) of ``responses`` under the current weights.

        Returns ``{"log_probs"}`` (plus ``"entropy"`` with ``with_entropy``), each ``[B, T_resp]``
        float32 in the rows' original order (dynamic batching and packing run them sorted or
        binned), 0 at unscored positions. The trainer only reads the log-probs (old and
        reference), so the entropy is not computed by default. ``micro_batch_size`` applies to
        fixed-size micro-batches only. ``reference``: score with the reference policy, the
        frozen base with the LoRA adapters off (``actor.lora``).
        """
        if reference:
            with self._reference_policy():
                return self._score(batch, micro_batch_size, with_entropy)
        return self._score(batch, micro_batch_size, with_entropy)

    def _score(self, batch: BatchedDataDict, micro_batch_size: int, with_entropy: bool) -> BatchedDataDict:
        self.model.eval()
        layout, groups = self.plan_micro_batches(batch, micro_batch_size)
        shape = batch["responses"].shape
        out = {"log_probs": torch.zeros(shape, dtype=torch.float32)}
        if with_entropy:
            out["entropy"] = torch.zeros(shape, dtype=torch.float32)
        for rows in groups:
            if not rows:
                self._idle_step(backward=False)
                continue
            lp, ent = self._forward(batch.select_indices(rows), layout, with_entropy=with_entropy)
            index = torch.tensor(rows)
            out["log_probs"][index] = lp.cpu()
            if with_entropy:
                out["entropy"][index] = ent.cpu()
        return BatchedDataDict(out)

    # ----------------------------------------------------------------- update
    def update_policy(self, batch: BatchedDataDict, mini_batch_size: int) -> dict[str, float]:
        """PPO-style update on this rank's shard.

        ``mini_batch_size`` is per rank: one optimiser step per mini-batch. Each micro-batch loss
        is its share of the mini-batch loss over ALL ranks (global token / sequence counts), so
        the accumulated gradient does not depend on the micro-batch size, the number of ranks,
        dynamic batching or packing. With ``actor.off_policy.correction`` on, each mini-batch is
        corrected first (``_correct_off_policy``); the batch then needs ``rollout_log_probs``.
        """
        acfg = self.cfg.actor
        self.model.train()
        sums: dict[str, float] = {}
        num_updates = 0
        for _epoch in range(acfg.ppo_epochs):
            order = torch.arange(batch.size)
            if acfg.shuffle_mini_batches:
                gen = torch.Generator().manual_seed(self.cfg.trainer.seed * 100003 + self.global_step)
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

    def accumulate_gradients(self, batch: BatchedDataDict) -> dict[str, torch.Tensor]:
        """Full (unsharded) gradients of the loss on ``batch`` taken as ONE mini-batch, by
        parameter name, on CPU; no optimiser step, and the gradients are cleared afterwards.

        Runs the same micro-batching and loss path as ``update_policy``; a collective with
        more than one rank (every rank must call it with its shard).
        """
        if not self.trainable:
            raise ValueError("accumulate_gradients needs the actor role; the ref policy has no loss")
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        self._backward_mini_batch(batch)
        grads: dict[str, torch.Tensor] = {}
        for name, param in self.model.named_parameters():
            if param.grad is None:
                continue
            grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
            grads[name] = grad.detach().cpu().clone()
        self.optimizer.zero_grad(set_to_none=True)
        return grads

    def _backward_mini_batch(self, mini: BatchedDataDict) -> torch.Tensor:
        """Accumulate the gradient of this rank's share of the mini-batch loss.

        Returns local sums of (pg_loss, entropy, kl, clipfrac, ppo_kl, loss) shares; summed over
        ranks they are the mini-batch values.
        """
        acfg = self.cfg.actor
        mini = self._correct_off_policy(mini)
        # Once per mini-batch: every micro-batch, whatever its size or layout, divides by the
        # same global counts, which is what makes the gradient invariant.
        num_tokens, num_seqs = global_token_and_seq_counts(mini["response_mask"], self.world_size)
        norm = dict(
            global_num_tokens=num_tokens,
            global_num_seqs=num_seqs,
            norm_length=self.cfg.data.max_response_length,
        )
        stats = torch.zeros(6, dtype=torch.float64)
        layout, groups = self.plan_micro_batches(mini, acfg.ppo_micro_batch_size_per_worker)
        for rows in groups:
            if not rows:
                self._idle_step(backward=True)
                continue
            mb = mini.select_indices(rows)
            mask = mb["response_mask"].to(self.device).float()
            # The entropy is always reported (actor/entropy); with entropy_coeff 0 it stays out
            # of the graph, so its backward term is never computed.
            log_probs, entropy = self._forward(mb, layout, with_entropy=True)
            if float(acfg.entropy_coeff) == 0.0:
                entropy = entropy.detach()
            old = mb["old_log_probs"].to(self.device) if "old_log_probs" in mb else log_probs.detach()
            adv = mb["advantages"].to(self.device)
            clip = dict(clip_ratio_low=acfg.clip_ratio_low, clip_ratio_high=acfg.clip_ratio_high)
            # Off-policy weights only when a correction is on: without them the loss is untouched.
            weights = {}
            if "off_policy_weights" in mb:
                weights["token_weights"] = mb["off_policy_weights"].to(self.device)
            if acfg.policy_loss == "gspo":
                pg_loss, pg_stats = policy_loss_gspo(
                    log_probs, old, adv, mask, loss_agg_mode=acfg.loss_agg_mode, **clip, **norm,
                    **weights,
                )
            else:
                pg_loss, pg_stats = policy_loss_clipped(
                    log_probs, old, adv, mask, clip_ratio_c=acfg.clip_ratio_c,
                    loss_agg_mode=acfg.loss_agg_mode, **clip, **norm, **weights,
                )
            entropy_share = aggregate_loss(entropy, mask, acfg.loss_agg_mode, **norm)
            loss = pg_loss - acfg.entropy_coeff * entropy_share
            kl_share = torch.zeros(())
            if acfg.use_kl_loss:
                kl = kl_penalty(log_probs, mb["ref_log_probs"].to(self.device), acfg.kl_loss_type)
                kl_share = aggregate_loss(kl, mask, acfg.loss_agg_mode, **norm)
                loss = loss + acfg.kl_loss_coef * kl_share
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
        return stats

    def _correct_off_policy(self, mini: BatchedDataDict) -> BatchedDataDict:
        """``mini`` with ``actor.off_policy.correction`` applied (itself when it is ``none``).

        The correction depends only on the batch (old and rollout log-probs), so it is
        computed once per mini-batch, before the global counts: its ``kept_mask`` replaces
        ``response_mask`` for every loss term and count, and its weights travel with the rows
        as ``off_policy_weights`` into the policy loss (``rlflow.algorithms.off_policy``).
        """
        opc = self.cfg.actor.off_policy
        if opc.correction == "none":
            return mini
        missing = [key for key in ("old_log_probs", "rollout_log_probs") if key not in mini]
        if missing:
            raise ValueError(
                f"actor.off_policy.correction={opc.correction} needs {' and '.join(missing)} in the "
                "update batch: the rollout must return rollout_log_probs and the actor must "
                "recompute old_log_probs (or set actor.off_policy.correction=none)"
            )
        weights, kept = correction_weights(
            opc.correction, mini["old_log_probs"], mini["rollout_log_probs"], mini["response_mask"],
            is_cap=opc.is_cap, mis_low=opc.mis_low, mis_high=opc.mis_high,
        )
        corrected = BatchedDataDict(dict(mini.items()))
        corrected["response_mask"] = kept
        corrected["off_policy_weights"] = weights
        return corrected

    def _update_one_mini_batch(self, mini: BatchedDataDict) -> dict[str, float]:
        acfg = self.cfg.actor
        self.optimizer.zero_grad(set_to_none=True)
        stats = self._backward_mini_batch(mini)
        grad_norm, skipped = clip_and_step(
            self.model, self.optimizer, self.lr_scheduler, acfg.optim.grad_clip
        )
        if self.world_size > 1:
            dist.all_reduce(stats)
        names = ("pg_loss", "entropy", "kl", "pg_clipfrac", "ppo_kl", "loss")
        out = {name: stats[i].item() for i, name in enumerate(names)}
        out["grad_norm"] = grad_norm
        out["skipped_updates"] = float(skipped)
        return out

    # ----------------------------------------------------------------- in-actor rollout
    def generate(self, batch: BatchedDataDict, **kwargs: Any) -> BatchedDataDict:
        """``rollout.placement=in_actor``: ``HFRolloutWorker.generate`` on this worker's model."""
        self.model.eval()
        return self.rollout.generate(batch, **kwargs)

    def use_own_weights(self, version: int) -> int:
        """The in-actor weight sync: the sampling model is the trained one, so only the version
        the rollout reports moves."""
        self.rollout.weight_version = int(version)
        return self.rollout.weight_version

    # ----------------------------------------------------------------- weights
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded CPU state dict; a collective, so every rank must call it."""
        return full_model_state(self.model)

    def publish_weights(self, lora_sync: Optional[str] = None) -> Optional[list]:
        """Put the full weights in the Ray object store; rank 0 returns ``[ref]``, others None.
        With LoRA: the adapters or the merged weights (``lora_sync``, default ``actor.lora.sync``).

        The reference is wrapped in a list so Ray hands it over as a reference instead of
        fetching the tensors into the driver.
        """
        state = lora_sync_state(self.model, self.cfg.actor.lora, lora_sync) if self.lora else self.full_state_dict()
        if self.rank != 0:
            return None
        return [put_state(state)]


# --------------------------------------------------------------------- planning helpers
def _step_cost(rows: list[int], lengths: list[int], layout: str, round_to: int) -> int:
    """Tokens one micro-batch computes: rows x rounded longest (unpadded), the sum (packed),
    or just the row count for fixed-size padded micro-batches (all rows are equally wide)."""
    if layout == "padded":
        return len(rows)
    if layout == "unpadded":
        return len(rows) * round_up(max((lengths[i] for i in rows), default=0), round_to)
    return sum(lengths[i] for i in rows)


def _split_to_count(
    groups: list[list[int]], count: int, lengths: list[int], layout: str, round_to: int
) -> list[list[int]]:
    """Grow ``groups`` to ``count`` steps, halving the costliest into token-balanced halves."""
    return split_to_count(
        groups, count,
        cost=lambda rows: _step_cost(rows, lengths, layout, round_to),
        halve=lambda rows: balanced_halves(rows, lengths.__getitem__),
    )
