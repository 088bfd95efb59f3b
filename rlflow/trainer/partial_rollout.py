"""Partial rollouts (``rollout.partial_rollout``): responses generated in segments.

Each generate call extends unfinished responses by at most ``rollout.partial_segment_tokens``
tokens. A rollout worker applies a weight sync between two calls, so a response whose
segments straddle a sync continues with the new weights instead of finishing with the old
ones; every token records the weight version that sampled it, and its log-prob under that
version (the behaviour policy the off-policy corrections need). The driver keeps the tokens
sampled so far: a segment lost with a dead worker is simply asked for again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlflow.data.batched_data_dict import BatchedDataDict
from rlflow.utils.torch_functional import pad_2d_list_to_tensor, response_batch

Prompt = tuple[int, int]  # (epoch, dataset index)


@dataclass
class PartialResponse:
    """One response being generated, segment by segment."""

    group: "PartialGroup"
    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)  # per token: the weights that sampled it
    done: bool = False

    def next_input(self, segment_tokens: int, max_tokens: int) -> tuple[list[int], int]:
        """The ids to continue from and the token budget of the next segment."""
        return self.prompt_ids + self.tokens, min(segment_tokens, max_tokens - len(self.tokens))

    def extend(self, tokens: list[int], log_probs: list[float], stopped: bool, version: int, budget: int, max_tokens: int) -> None:
        self.tokens += tokens
        self.log_probs += log_probs
        self.versions += [int(version)] * len(tokens)
        # A segment shorter than its budget ended at a stop token (or the engine's limit).
        self.done = stopped or len(tokens) < budget or len(self.tokens) >= max_tokens


class PartialGroup:
    """One prompt's ``rollout.n`` responses, finished once every response is."""

    def __init__(self, prompt: Prompt, rows: BatchedDataDict) -> None:
        self.prompt = prompt
        self.rows = rows  # the prompt repeated rollout.n times, as the driver built it
        ids, mask = rows["input_ids"], rows["attention_mask"].bool()
        self.responses = [PartialResponse(self, ids[i][mask[i]].tolist()) for i in range(rows.size)]

    def finished(self) -> bool:
        return all(r.done for r in self.responses)

    def batch(self, max_tokens: int, pad_token_id: int) -> BatchedDataDict:
        """The finished group in the layout every rollout returns, plus
        ``rollout_token_version`` (``[n, max_tokens]``, the version of each token, 0 on padding);
        ``weight_version`` is each response's oldest token's version."""
        def padded(rows: list[list], value: float, dtype: torch.dtype) -> torch.Tensor:
            return pad_2d_list_to_tensor(rows, value, max_length=max_tokens, dtype=dtype)

        responses = padded([r.tokens for r in self.responses], pad_token_id, torch.long)
        mask = padded([[1] * len(r.tokens) for r in self.responses], 0, torch.long)
        batch = self.rows
        batch.update(response_batch(self.rows["input_ids"], self.rows["attention_mask"], responses, mask))
        batch["rollout_log_probs"] = padded([r.log_probs for r in self.responses], 0.0, torch.float32)
        batch["rollout_token_version"] = padded([r.versions for r in self.responses], 0, torch.long)
        batch["weight_version"] = [min(r.versions, default=0) for r in self.responses]
        return batch


def token_version_metrics(trainer_version: int, token_versions: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """``rollout/token_lag``: syncs between each response token's weights and the trained ones,
    averaged over tokens; ``rollout/multi_version_frac``: the fraction of responses whose
    tokens come from more than one weight version (continued across a sync)."""
    valid = mask.bool()
    if not bool(valid.any()):
        return {"rollout/token_lag": 0.0, "rollout/multi_version_frac": 0.0}
    lags = (trainer_version - token_versions)[valid].double()
    big = torch.iinfo(token_versions.dtype).max
    newest = torch.where(valid, token_versions, torch.full_like(token_versions, -1)).max(dim=1).values
    oldest = torch.where(valid, token_versions, torch.full_like(token_versions, big)).min(dim=1).values
    rows = valid.any(dim=1)
    return {
        "rollout/token_lag": lags.mean().item(),
        "rollout/multi_version_frac": (newest[rows] != oldest[rows]).double().mean().item(),
    }
