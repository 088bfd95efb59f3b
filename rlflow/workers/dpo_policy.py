"""The policy worker for DPO: sequence log-probs of preference pairs and DPO updates.

It reuses ``PolicyWorker``'s model set-up (loading, FSDP2 sharding, optimiser, weights) and
adds the two methods DPO needs. Batches come from ``collate_preference``: ``2B`` right-padded
rows, row ``2k`` the chosen and row ``2k + 1`` the rejected sequence of pair ``k``, with a
``loss_mask`` that is 1 on answer tokens. A sequence's log-prob is the sum, over answer
tokens, of ``log p(token | everything before it)`` at temperature 1.

Both roles use this class: the actor (trainable) and the frozen reference (``role="ref"``);
with LoRA (``actor.lora``) the actor scores the reference itself, its adapters off.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist

from rlflow.algorithms.losses import dpo_loss
from rlflow.data.batched_data_dict import BatchedDataDict
from rlflow.models.packing import ModelInputs, score_responses
from rlflow.workers.fsdp import clip_and_step
from rlflow.workers.policy import PolicyWorker

# Per-rank statistics summed over micro-batches and ranks, then divided by the pair count.
_PAIR_STATS = ("loss", "accuracy", "margin", "chosen_rewards", "rejected_rewards", "chosen_logps", "rejected_logps")


class DPOPolicyWorker(PolicyWorker):
    def __init__(self, config: dict, role: str, total_steps: int = 1, with_reference: bool = False) -> None:
        super().__init__(config, role, total_steps, with_reference)
        # DPO scores the data as written: no sampling temperature.
        self.temperature = 1.0

    # ----------------------------------------------------------------- forward
    def _answer_log_probs(self, mb: BatchedDataDict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs of ``input_ids[:, 1:]`` and their mask ``loss_mask[:, 1:]``,
        both ``(b, T - 1)``; masked positions hold 0."""
        input_ids = mb["input_ids"].to(self.device)
        mask = mb["loss_mask"][:, 1:].to(self.device)
        scored = mask != 0
        # Logits at position t score token t + 1: keep the positions before each answer token.
        inputs = ModelInputs(
            input_ids=input_ids,
            position_ids=mb["position_ids"].to(self.device),
            attention_mask=mb["attention_mask"].to(self.device),
            keep=torch.cat([scored, scored.new_zeros(scored.shape[0], 1)], dim=1),
            targets=input_ids[:, 1:][scored],
            scatter=scored,
        )
        # The shared scorer: the LM head runs a block of tokens at a time, so the float32
        # [tokens, vocab] logits of the micro-batch never exist.
        log_probs, _ = score_responses(self.model, inputs)
        return log_probs, mask

    @staticmethod
    def _pair_microbatches(batch: BatchedDataDict, size: int) -> Iterator[BatchedDataDict]:
        # An even number of rows keeps every (chosen, rejected) pair in one micro-batch; the
        # last micro-batch may be shorter. Equal shards give every rank the same count (FSDP).
        size = max(2, int(size) - int(size) % 2)
        for start in range(0, batch.size, size):
            yield batch.slice(start, min(start + size, batch.size))

    @torch.no_grad()
    def compute_sequence_log_probs(
        self, batch: BatchedDataDict, micro_batch_size: int, reference: bool = False
    ) -> BatchedDataDict:
        """``{"logps": (N,), "num_tokens": (N,)}``: summed answer log-probs and answer lengths
        of each row under the current weights (no gradient); ``reference``: under the
        reference policy (the frozen copy, or the LoRA base with the adapters off)."""
        if reference:
            with self._reference_policy():
                return self.compute_sequence_log_probs(batch, micro_batch_size)
        self.model.eval()
        logps, counts = [], []
        for start in range(0, batch.size, max(1, int(micro_batch_size))):
            mb = batch.slice(start, min(start + int(micro_batch_size), batch.size))
            token_lp, mask = self._answer_log_probs(mb)
            logps.append(token_lp.sum(-1).cpu())
            counts.append(mask.sum(-1).cpu())
        return BatchedDataDict({"logps": torch.cat(logps), "num_tokens": torch.cat(counts)})

    # ----------------------------------------------------------------- update
    def update_dpo(self, batch: BatchedDataDict, micro_batch_size: int) -> dict[str, float]:
        """One optimiser step on this rank's pairs (``batch`` also carries ``ref_logps``).

        Loss over the global batch of ``P`` pairs (all ranks):
        ``sum_pairs dpo_loss / P + sft_loss_coef * sum_chosen_tokens(-log p) / N_chosen`` with
        ``N_chosen`` the global number of chosen answer tokens; each micro-batch contributes
        its share, so the gradient does not depend on micro-batch or data-parallel size.

        Returns metrics identical on every rank: ``dpo/loss``, ``dpo/sft_loss``,
        ``dpo/accuracy`` (share of pairs with chosen reward > rejected reward), ``dpo/margin``,
        ``dpo/chosen_rewards``, ``dpo/rejected_rewards`` (means of ``beta * (policy - ref)``),
        ``dpo/chosen_logps``, ``dpo/rejected_logps``, ``actor/grad_norm``, ``actor/lr``.
        """
        if batch.size % 2:
            raise ValueError(
                f"update_dpo got {batch.size} rows; preference batches hold (chosen, rejected) "
                "row pairs, so the row count must be even"
            )
        dcfg = self.cfg.dpo
        self.model.train()
        chosen_tokens = float(batch["loss_mask"][0::2, 1:].sum())
        counts = torch.tensor([batch.size / 2, chosen_tokens], dtype=torch.float64)
        if self.world_size > 1:
            dist.all_reduce(counts)
        num_pairs, num_chosen_tokens = counts[0].item(), max(counts[1].item(), 1.0)

        sums = torch.zeros(len(_PAIR_STATS) + 1, dtype=torch.float64)  # pair stats, then sft nll sum
        self.optimizer.zero_grad(set_to_none=True)
        for mb in self._pair_microbatches(batch, micro_batch_size):
            token_lp, mask = self._answer_log_probs(mb)
            seq_lp = token_lp.sum(-1).view(-1, 2)
            ref = mb["ref_logps"].to(self.device).float().view(-1, 2)
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                seq_lp[:, 0], seq_lp[:, 1], ref[:, 0], ref[:, 1],
                beta=dcfg.beta, loss_type=dcfg.loss_type, label_smoothing=dcfg.label_smoothing,
            )
            chosen_nll = -token_lp[0::2].sum()
            loss = losses.sum() / num_pairs + dcfg.sft_loss_coef * chosen_nll / num_chosen_tokens
            # FSDP averages gradients over ranks; the loss is already this rank's share.
            (loss * self.world_size).backward()
            with torch.no_grad():
                sums += torch.tensor(
                    [
                        losses.sum().item(),
                        (chosen_rewards > rejected_rewards).float().sum().item(),
                        (chosen_rewards - rejected_rewards).sum().item(),
                        chosen_rewards.sum().item(),
                        rejected_rewards.sum().item(),
                        seq_lp[:, 0].sum().item(),
                        seq_lp[:, 1].sum().item(),
                        chosen_nll.item(),
                    ],
                    dtype=torch.float64,
                )
        grad_norm, skipped = clip_and_step(
            self.model, self.optimizer, self.lr_scheduler, self.cfg.actor.optim.grad_clip
        )
        self.global_step += 1
        if self.world_size > 1:
            dist.all_reduce(sums)
        metrics = {f"dpo/{name}": sums[i].item() / num_pairs for i, name in enumerate(_PAIR_STATS)}
        metrics["dpo/sft_loss"] = sums[-1].item() / num_chosen_tokens
        metrics["actor/grad_norm"] = grad_norm
        metrics["actor/lr"] = self.optimizer.param_groups[0]["lr"]
        metrics["actor/skipped_updates"] = float(skipped)
        return metrics
