"""AsyncRollout's bookkeeping: stale groups are dropped and their prompts queued first again."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from rlflow.data.batched_data_dict import BatchedDataDict
from rlflow.data.prompt_batches import PromptBatches
from rlflow.trainer.async_rollout import AsyncRollout, Group


def rollout(max_staleness: int) -> AsyncRollout:
    # Nothing here reaches a worker: the group only tells how many ranks there are.
    return AsyncRollout(
        SimpleNamespace(world_size=1), "generate", PromptBatches(8, 4, shuffle=False), lambda idx: None,
        lambda batch: batch, lambda err, n: None,
        train_batch_size=2, prompts_per_call=2, max_staleness=max_staleness, weight_version=0,
    )


def group(index: int, version: int) -> Group:
    return Group((0, index), BatchedDataDict({"x": torch.zeros(2)}), version)


def test_groups_beyond_the_bound_are_dropped_counted_and_queued_first():
    ar = rollout(max_staleness=2)
    ar.restore(pending=[(0, 7)], prompts_to_draw=0)
    ar.buffer = [group(1, 3), group(2, 1), group(3, 2), group(4, 0)]
    ar._drop_stale(trainer_version=4)  # lags 1, 3, 2, 4
    assert [g.prompt for g in ar.buffer] == [(0, 1), (0, 3)]
    assert list(ar.queue) == [(0, 2), (0, 4), (0, 7)], "dropped prompts, oldest first, before the queue"
    assert ar.stale_dropped == 2
    # Still pending: a checkpoint would save all of them as not consumed.
    assert sorted(ar.pending()) == [(0, 1), (0, 2), (0, 3), (0, 4), (0, 7)]


def test_prompts_are_drawn_a_batch_at_a_time_and_only_as_many_as_the_run_needs():
    ar = rollout(max_staleness=1)
    ar.restore(pending=[(0, 5)], prompts_to_draw=4)
    assert ar._next_prompts() == [(0, 5), (0, 0)]
    assert ar._next_prompts() == [(0, 1), (0, 2)]
    assert ar._next_prompts() == [(0, 3)]
    assert ar._next_prompts() == []
