"""Rule-based reward worker: decode each response and score it by its ``data_source``.

The score goes on the last valid response token (``token_level_scores``), the layout every
advantage estimator expects. A scorer may return a float or a dict with ``score`` plus extra
values, which come back as per-sample lists and are logged as ``reward/<name>``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch

from rlflow.config.schema import typed_config
from rlflow.data.batched_data_dict import BatchedDataDict
from rlflow.models.loading import load_tokenizer
from rlflow.data.custom_loading import load_object
from rlflow.rewards.combine import build_reward_fn
from rlflow.rewards.guarded import guarded_score
from rlflow.rewards.registry import default_compute_score
from rlflow.workers.base import Worker

ScoreFn = Callable[..., Any]
logger = logging.getLogger(__name__)


class RewardWorker(Worker):
    def __init__(self, config: dict, score_fn: Optional[ScoreFn] = None) -> None:
        """``score_fn``: a Python callable passed from the driver (it travels pickled); else
        ``reward.fns`` (several, weighted), ``reward.custom_fn`` or the built-in registry."""
        super().__init__()
        self.cfg = typed_config(config)
        self.tokenizer = load_tokenizer(self.cfg.model)
        rcfg = self.cfg.reward
        if score_fn is not None:
            self.score_fn: ScoreFn = score_fn
        elif rcfg.fns:
            self.score_fn = build_reward_fn(list(rcfg.fns))
        elif rcfg.custom_fn.path:
            self.score_fn = load_object(rcfg.custom_fn.path, rcfg.custom_fn.name)
        else:
            self.score_fn = default_compute_score

    def compute_reward(self, batch: BatchedDataDict) -> BatchedDataDict:
        responses = batch["responses"]
        mask = batch["response_mask"]
        lengths = mask.sum(dim=1)
        texts = self.tokenizer.batch_decode(
            [row[: int(n)].tolist() for row, n in zip(responses, lengths)], skip_special_tokens=True
        )
        scores = torch.zeros(batch.size, dtype=torch.float32)
        extras: dict[str, list[float]] = {}
        failed = torch.zeros(batch.size)
        timed_out = torch.zeros(batch.size)
        rcfg = self.cfg.reward
        for i, text in enumerate(texts):
            kwargs = dict(
                data_source=batch["data_source"][i],
                solution_str=text,
                ground_truth=(batch["reward_model"][i] or {}).get("ground_truth"),
                extra_info=batch["extra_info"][i],
            )
            result, failure = guarded_score(self.score_fn, kwargs, rcfg.timeout_s, float(rcfg.error_score))
            if failure is not None:
                (timed_out if failure == "timeout" else failed)[i] = 1.0
                logger.warning("reward function %s on sample %d; scored %s", failure, i, rcfg.error_score)
            if isinstance(result, dict):
                scores[i] = float(result["score"])
                for key, value in result.items():
                    if key != "score":
                        extras.setdefault(key, [0.0] * batch.size)[i] = float(value)
            else:
                scores[i] = float(result)
        token_level = torch.zeros(responses.shape, dtype=torch.float32)
        last = (lengths - 1).clamp(min=0)
        token_level[torch.arange(batch.size), last] = scores * (lengths > 0).float()
        out = BatchedDataDict({"token_level_scores": token_level, "scores": scores})
        # Per-sample flags so the driver can count failures across all reward workers.
        out["reward_failed"] = failed
        out["reward_timed_out"] = timed_out
        for key, values in extras.items():
            out[f"reward_extra/{key}"] = torch.tensor(values)
        return out
