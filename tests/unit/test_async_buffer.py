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


def test_partial_rollouts_continue_unfinished_responses_and_redo_only_lost_segments():
    from rlflow.distributed.worker_group import WorkerDiedError
    from rlflow.trainer.async_rollout import Segments

    sent = []  # (method, args) of every call the driver starts; the index is the fake ref
    fake_group = SimpleNamespace(
        world_size=1, respawn=lambda rank: None,
        call_rank_async=lambda rank, method, *args, **kw: sent.append((method, args)) or len(sent) - 1,
    )

    def make_batch(indices):  # each prompt is [1, 10 + index], left-padded by one, 2 responses each
        ids = torch.tensor([[0, 1, 10 + i] for i in indices])
        return BatchedDataDict({"input_ids": ids, "attention_mask": (ids != 0).long()}).repeat_interleave(2)

    ar = AsyncRollout(
        fake_group, "generate", PromptBatches(8, 2, shuffle=False), make_batch, lambda b: b, lambda err, n: None,
        train_batch_size=2, prompts_per_call=1, max_staleness=1, weight_version=0,
        segments=Segments(tokens=2, max_tokens=3, pad_token_id=0),
    )
    ar.restore(pending=[], prompts_to_draw=2)
    ar.top_up()  # two calls queued: the first segment of prompt 0, then of prompt 1
    assert [method for method, _ in sent] == ["generate_segments"] * 2
    assert sent[0][1] == ([[1, 10], [1, 10]], [2, 2]) and sent[1][1] == ([[1, 11], [1, 11]], [2, 2])
    assert ar.pending() == [(0, 0), (0, 1)], "open groups are pending, not consumed"

    first = ar.calls[0].pop(0)
    ar._add_segments(first, {"tokens": [[5, 6], [7]], "log_probs": [[-1.0, -2.0], [-3.0]],
                             "stopped": [False, True], "weight_version": 0})
    assert ar.buffer == [] and len(ar.unfinished) == 1  # prompt 0's first response needs a third token

    # The worker dies with prompt 1's first segment in flight: only that segment is redone.
    ar._replace_worker(0, WorkerDiedError("dead", "rollout", 0, "generate_segments"))
    ar.weight_version = 1
    ar.top_up()
    assert sent[2][1] == ([[1, 11], [1, 11]], [2, 2])
    assert sent[3][1] == ([[1, 10, 5, 6]], [1]), "continued from the tokens sampled before"
    ar.calls[0].pop(0)
    ar._add_segments(ar.calls[0].pop(0), {"tokens": [[8]], "log_probs": [[-4.0]], "stopped": [False],
                                          "weight_version": 1})
    (group_0,) = ar.buffer
    assert group_0.prompt == (0, 0) and group_0.weight_version == 0  # its oldest token's version
    assert group_0.batch["responses"].tolist() == [[5, 6, 8], [7, 0, 0]]
    assert group_0.batch["response_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert group_0.batch["rollout_token_version"].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert group_0.batch["rollout_log_probs"].tolist() == [[-1.0, -2.0, -4.0], [-3.0, 0.0, 0.0]]
    assert group_0.batch["input_ids"].tolist() == [[0, 1, 10, 5, 6, 8], [0, 1, 10, 7, 0, 0]]
    assert ar.pending() == [(0, 0), (0, 1)]
