"""Rule-based reward worker: decode each response and score it by its ``data_source``.

The score goes on the last valid response token (``token_level_scores``), the layout every
advantage estimator expects. A scorer may return a float or a dict with ``score`` plus extra
values, which come back as per-sample lists and are logged as ``reward/<name>``.

Scoring is bounded twice: each call by ``reward.timeout_s``, and the whole batch by
``reward.batch_timeout_s`` (samples not reached by then are not scored), so a scorer that
never returns costs a step at most ``batch_timeout_s``, not ``timeout_s`` per sample.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

import torch

from rlflow.config.schema import typed_config
from rlflow.data.batched_data_dict import BatchedDataDict
from rlflow.errors import RewardError
from rlflow.models.loading import load_tokenizer
from rlflow.rewards.combine import resolve_reward_fn
from rlflow.rewards.contract import check_result, describe, row_problem
from rlflow.rewards.guarded import alarm_handler, guarded_score
from rlflow.workers.base import Worker

ScoreFn = Callable[..., Any]
logger = logging.getLogger(__name__)


class RewardWorker(Worker):
    def __init__(self, config: dict, score_fn: Optional[ScoreFn] = None) -> None:
        """``score_fn``: a Python callable passed from the driver (it travels pickled); else
        ``reward.fns`` (several, weighted), ``reward.custom_fn`` or the built-in registry."""
        super().__init__()
        self.cfg = typed_config(config)
        self.scorer = BatchScorer(self.cfg.reward, load_tokenizer(self.cfg.model), score_fn)

    def compute_reward(self, batch: BatchedDataDict) -> BatchedDataDict:
        return self.scorer.score(batch)


class BatchScorer:
    """Scores generated batches; used by the reward workers, and by the driver itself when
    ``reward.num_workers=0`` (rule rewards cost less than a round trip to another process)."""

    def __init__(self, reward_cfg: Any, tokenizer: Any, score_fn: Optional[ScoreFn] = None) -> None:
        self.rcfg = reward_cfg
        self.tokenizer = tokenizer
        self.score_fn: ScoreFn = resolve_reward_fn(reward_cfg, score_fn)

    def score(self, batch: BatchedDataDict) -> BatchedDataDict:
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
        rcfg = self.rcfg
        rows = batch["index"] if "index" in batch else list(range(batch.size))
        deadline = None if not rcfg.batch_timeout_s else time.monotonic() + float(rcfg.batch_timeout_s)
        with alarm_handler():  # one handler for the batch; each sample only arms the timer
            for i, text in enumerate(texts):
                kwargs = dict(
                    data_source=batch["data_source"][i],
                    solution_str=text,
                    ground_truth=(batch["reward_model"][i] or {}).get("ground_truth"),
                    extra_info=batch["extra_info"][i],
                )
                problem = row_problem(self.score_fn, kwargs["data_source"], kwargs["ground_truth"])
                if problem is not None:
                    raise RewardError(f"data row {rows[i]}: {problem}")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    result, failure = rcfg.error_score, "timeout"
                else:
                    limit = rcfg.timeout_s if remaining is None else min(rcfg.timeout_s or remaining, remaining)
                    result, failure = guarded_score(self.score_fn, kwargs, limit, rcfg.error_score)
                if failure is not None:
                    (timed_out if failure == "timeout" else failed)[i] = 1.0
                else:
                    check_result(self.score_fn, result)
                if isinstance(result, dict):
                    scores[i] = float(result["score"])
                    for key, value in result.items():
                        if key != "score":
                            extras.setdefault(key, [0.0] * batch.size)[i] = float(value)
                else:
                    scores[i] = float(result)
        self._report(failed, timed_out, rows)
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

    def _report(self, failed: torch.Tensor, timed_out: torch.Tensor, rows: list) -> None:
        """One warning per batch naming the data rows whose scoring raised or timed out."""
        rcfg = self.rcfg
        for flags, what in ((failed, "raised"), (timed_out, "timed out")):
            hit = [rows[i] for i in flags.nonzero().flatten().tolist()]
            if hit:
                logger.warning(
                    "reward function %s %s on %d sample(s), data rows %s%s (limits: reward.timeout_s=%s per "
                    "sample, reward.batch_timeout_s=%s per batch); scored reward.error_score=%s",
                    describe(self.score_fn), what, len(hit), hit[:20], " ..." if len(hit) > 20 else "",
                    rcfg.timeout_s, rcfg.batch_timeout_s, rcfg.error_score,
                )
