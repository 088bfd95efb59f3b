"""``run_episodes`` for any rollout backend: the multi-turn loop of ``rlflow/agents`` driven by
the backend's own ``generate_turns`` (one batched engine call per turn, token ids in and out)."""

from __future__ import annotations

import itertools
from typing import Any, Callable, Optional

import torch

from rlflow.agents.environments import environment_factory
from rlflow.agents.episodes import run_episodes
from rlflow.data.batched_data_dict import BatchedDataDict
from rlflow.rewards.combine import resolve_reward_fn
from rlflow.workers.rollout.policy_lag import check_weight_version
from rlflow.workers.rollout.sampling import SamplingSettings

# A turn's engine seed: far from the step seeds, distinct per (step, turn).
_TURN_SEED_STRIDE = 1_000


class EpisodeRollout:
    """Mixed into a rollout worker that has ``cfg``, ``rank``, ``tokenizer``,
    ``weight_version``, ``sampling_settings()`` and ``generate_turns()``."""

    def _init_episodes(self, score_fn: Optional[Callable[..., Any]]) -> None:
        """``score_fn``: the run's reward function object, when the driver was given one."""
        self.make_env = None
        if self.cfg.agent.enable:
            self.make_env = environment_factory(self.cfg, resolve_reward_fn(self.cfg.reward, score_fn))

    def start_call(
        self, seed: int, temperature: Optional[float], do_sample: Optional[bool], expected_weight_version: Optional[int]
    ) -> SamplingSettings:
        """What every generating call does first: refuse weights that lag too far, resolve the
        sampling settings, and seed torch per call and rank, so a run (and a resumed run)
        samples the same tokens."""
        check_weight_version(
            self.weight_version, expected_weight_version, self.cfg.rollout.max_weight_staleness, self.rank
        )
        torch.manual_seed(int(seed) * 1009 + self.rank)
        return self.sampling_settings(temperature, do_sample)

    def generate_turns(
        self, prompts: list[list[int]], budgets: list[int], settings: SamplingSettings, seed: int
    ) -> list[tuple[list[int], list[float]]]:
        """One turn per prompt: sampled ids up to the first stop token (included) or the
        prompt's budget, with their log-probs."""
        raise NotImplementedError

    @torch.no_grad()
    def generate_segments(
        self, prompts: list[list[int]], budgets: list[int], seed: int, expected_weight_version: Optional[int] = None
    ) -> dict[str, Any]:
        """Partial rollouts: extend each response by at most ``budgets[i]`` tokens with the
        weights held now. ``prompts[i]`` is its prompt's ids followed by the tokens sampled so
        far. Returns the new ``tokens`` and ``log_probs`` per row, whether each ``stopped`` at a
        stop token, and the ``weight_version`` that sampled them."""
        settings = self.start_call(seed, None, None, expected_weight_version)
        segments = self.generate_turns(prompts, budgets, settings, int(seed))
        stops = set(settings.stop_token_ids)
        return {
            "tokens": [tokens for tokens, _ in segments],
            "log_probs": [log_probs for _, log_probs in segments],
            "stopped": [bool(tokens) and tokens[-1] in stops for tokens, _ in segments],
            "weight_version": self.weight_version,
        }

    @torch.no_grad()
    def run_episodes(
        self,
        batch: BatchedDataDict,
        seed: int,
        temperature: Optional[float] = None,
        do_sample: Optional[bool] = None,
        expected_weight_version: Optional[int] = None,
    ) -> BatchedDataDict:
        """One multi-turn episode per row (``agent.*``); same output layout as ``generate``."""
        settings = self.start_call(seed, temperature, do_sample, expected_weight_version)
        turns = itertools.count()
        rows = [{key: batch[key][i] for key in batch.keys()} for i in range(batch.size)]
        result = run_episodes(
            rows, self.make_env,
            lambda prompts, budgets: self.generate_turns(
                prompts, budgets, settings, int(seed) * _TURN_SEED_STRIDE + next(turns)
            ),
            self.tokenizer, self.cfg, settings.stop_token_ids,
        )
        result["weight_version"] = [self.weight_version] * result.size
        return result


def cut_at_stop(ids: list[int], log_probs: list[float], budget: int, stops: set[int]) -> tuple[list[int], list[float]]:
    """The turn's ids up to its first stop token (kept) within ``budget`` tokens."""
    end = min(budget, len(ids))
    for j, token in enumerate(ids[:end]):
        if token in stops:
            end = j + 1
            break
    return ids[:end], log_probs[:end]
