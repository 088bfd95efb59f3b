"""rollout.mode=async: rollout workers generate continuously; the trainer takes from a buffer.

The driver keeps every rollout worker supplied with its own small generate calls (a few
prompt groups each), so no worker waits for another. Finished calls are split into prompt
groups (a prompt's ``rollout.n`` responses stay together for group baselines) and kept, in
the order they finished, in a queue on the driver: the buffer. A training step takes the
oldest ``data.train_batch_size`` groups as soon as that many are buffered.

Every response carries the weight version that sampled it. A group that would be trained
more than ``rollout.max_weight_staleness`` syncs after its version is dropped and its prompt
goes back to the front of the queue, to be generated again with newer weights.

Prompts are tracked individually as ``(epoch, dataset index)``. Those drawn but not yet
trained (waiting, being generated, or buffered) are the ``pending`` prompts: a checkpoint
saves them as not consumed, so a resumed run generates them again and each prompt of an
epoch is trained on exactly once.

A rollout worker that dies is replaced on its own (the rollout ranks share no collective):
the prompts of its unfinished calls go back to the front of the queue, the new worker gets
the latest weights before its first call, and training goes on without a rollback.

With ``rollout.partial_rollout`` a call generates one segment of each of its responses
(``partial_rollout.py``): unfinished responses are continued by later calls, before new
prompts are drawn, and a group enters the buffer when all its responses are finished.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import ray

from rlflow.data.batched_data_dict import BatchedDataDict
from rlflow.data.prompt_batches import PromptBatches
from rlflow.distributed.worker_group import WorkerDiedError, WorkerGroup
from rlflow.trainer.partial_rollout import PartialGroup, PartialResponse, Prompt

# Calls queued on one worker: while it runs one, the next is already there, so the worker
# never waits for the driver. More would only delay the weight syncs queued behind them.
CALLS_PER_WORKER = 2


@dataclass
class _GenerateCall:
    rank: int
    ref: ray.ObjectRef
    prompts: list[Prompt]  # whole prompts (none for a call of segments)
    batch: Optional[BatchedDataDict] = None  # the prompts, each repeated rollout.n times
    segments: list[tuple[PartialResponse, int]] = field(default_factory=list)  # (response, budget)


@dataclass
class Segments:
    """``rollout.partial_rollout``: responses extended by at most ``tokens`` per call, up to
    ``max_tokens`` (``data.max_response_length``)."""

    tokens: int
    max_tokens: int
    pad_token_id: int


@dataclass
class Group:
    """One prompt's ``rollout.n`` finished responses."""

    prompt: Prompt
    batch: BatchedDataDict
    weight_version: int


class AsyncRollout:
    """The driver's side of async generation: prompt queue, calls in flight, finished groups."""

    def __init__(
        self,
        group: WorkerGroup,
        method: str,
        batches: PromptBatches,
        make_batch: Callable[[list[int]], BatchedDataDict],
        view: Callable[[BatchedDataDict], BatchedDataDict],
        on_worker_lost: Callable[[WorkerDiedError, int], None],
        *,
        train_batch_size: int,
        prompts_per_call: int,
        max_staleness: int,
        weight_version: int,
        segments: Optional[Segments] = None,
    ) -> None:
        self.group = group
        self.method = method  # generate, or run_episodes for multi-turn agents
        self.batches = batches
        self.make_batch = make_batch  # dataset indices -> prompts repeated rollout.n times
        self.view = view  # the keys the generate method reads
        # Told (with the number of prompts to generate again) before a dead worker is
        # replaced; it may raise to give up (a restart limit).
        self.on_worker_lost = on_worker_lost
        self.train_batch_size = train_batch_size
        self.prompts_per_call = prompts_per_call
        self.max_staleness = max_staleness
        # Groups generated ahead of training. A group submitted with this many ahead of it is
        # trained about max_staleness steps later, so few exceed the bound and are dropped.
        self.max_ahead = max(1, max_staleness) * train_batch_size
        self.weight_version = weight_version
        self.weights: list | None = None  # the latest pushed weights, for a replaced worker
        self.queue: deque[Prompt] = deque()  # drawn, not yet sent to a worker
        self.calls: dict[int, list[_GenerateCall]] = {rank: [] for rank in range(group.world_size)}
        self.buffer: list[Group] = []
        self.syncs: list[tuple[int, ray.ObjectRef]] = []  # weight updates not yet confirmed
        self.prompts_to_draw = 0  # new prompts still needed for the run's remaining steps
        self.num_calls = 0  # seeds the generate calls
        self.stale_dropped = 0  # since the last take
        self.segments = segments
        self.open: list[PartialGroup] = []  # partial rollouts: groups with unfinished responses
        self.unfinished: deque[PartialResponse] = deque()  # ... waiting for their next segment

    # ----------------------------------------------------------------- state
    def restore(self, pending: list[Prompt], prompts_to_draw: int) -> None:
        """Start over from a checkpoint: ``pending`` prompts first, then ``prompts_to_draw`` new
        ones from the prompt order. Calls in flight and buffered groups are forgotten."""
        self.queue = deque((int(e), int(i)) for e, i in pending)
        self.calls = {rank: [] for rank in range(self.group.world_size)}
        self.buffer = []
        self.syncs = []
        self.weights = None
        self.prompts_to_draw = prompts_to_draw
        self.open, self.unfinished = [], deque()

    def pending(self) -> list[Prompt]:
        """Prompts drawn but not trained: buffered, being generated, or waiting, oldest first."""
        in_flight = [p for calls in self.calls.values() for call in calls for p in call.prompts]
        partial = [g.prompt for g in self.open]
        return [g.prompt for g in self.buffer] + partial + in_flight + list(self.queue)

    def _num_ahead(self) -> int:
        in_flight = sum(len(c.prompts) for calls in self.calls.values() for c in calls)
        return len(self.buffer) + len(self.open) + in_flight

    # ----------------------------------------------------------------- generation
    def push_weights(self, state_ref: list, version: int) -> None:
        """Send weights ``version`` to every worker without waiting: each applies it after the
        calls already queued on it, and every call sent from now on samples with it."""
        self.weight_version = version
        self.weights = state_ref
        refs = self.group.call_all_async("update_weights", state_ref, version)
        self.syncs.extend(enumerate(refs))

    def _next_prompts(self) -> list[Prompt]:
        while len(self.queue) < self.prompts_per_call and self.prompts_to_draw > 0:
            indices = self.batches.next_indices()
            self.queue.extend((self.batches.epoch, i) for i in indices)
            self.prompts_to_draw -= len(indices)
        count = min(self.prompts_per_call, len(self.queue))
        return [self.queue.popleft() for _ in range(count)]

    def top_up(self) -> None:
        """Give every worker with room a new call, while the run needs more groups."""
        for rank, calls in self.calls.items():
            while len(calls) < CALLS_PER_WORKER:
                call = self._segment_call(rank) if self.segments else self._whole_call(rank)
                if call is None:
                    return
                calls.append(call)

    def _whole_call(self, rank: int) -> Optional[_GenerateCall]:
        prompts = self._next_prompts() if self._num_ahead() < self.max_ahead else []
        if not prompts:
            return None
        batch = self.make_batch([index for _, index in prompts])
        self.num_calls += 1
        ref = self.group.call_rank_async(
            rank, self.method, self.view(batch), seed=self.num_calls, expected_weight_version=self.weight_version,
        )
        return _GenerateCall(rank, ref, prompts, batch)

    def _segment_call(self, rank: int) -> Optional[_GenerateCall]:
        """The next segment of unfinished responses, or the first of new prompts' responses."""
        if not self.unfinished and self._num_ahead() < self.max_ahead:
            prompts = self._next_prompts()
            if prompts:
                batch = self.make_batch([index for _, index in prompts])
                for prompt, rows in _per_prompt(prompts, batch):
                    group = PartialGroup(prompt, rows)
                    self.open.append(group)
                    self.unfinished.extend(group.responses)
        if not self.unfinished:
            return None
        size = self.prompts_per_call * len(self.open[0].responses)  # responses per call
        responses = [self.unfinished.popleft() for _ in range(min(size, len(self.unfinished)))]
        inputs = [r.next_input(self.segments.tokens, self.segments.max_tokens) for r in responses]
        self.num_calls += 1
        ref = self.group.call_rank_async(
            rank, "generate_segments", [ids for ids, _ in inputs], [budget for _, budget in inputs],
            seed=self.num_calls, expected_weight_version=self.weight_version,
        )
        return _GenerateCall(rank, ref, [], segments=[(r, budget) for r, (_, budget) in zip(responses, inputs)])

    def _watched(self) -> list[ray.ObjectRef]:
        return [c.ref for calls in self.calls.values() for c in calls] + [ref for _, ref in self.syncs]

    def _harvest(self) -> None:
        """Move finished calls into the buffer and replace dead workers; a worker whose call
        raised raises here."""
        for rank, calls in self.calls.items():
            while calls and _is_ready(calls[0].ref):  # a worker finishes its calls in order
                try:
                    (result,) = self.group.get([calls[0].ref], self.method, ranks=[rank])
                except WorkerDiedError as err:
                    self._replace_worker(rank, err)
                    break
                call = calls.pop(0)
                if call.segments:
                    self._add_segments(call, result)
                    continue
                call.batch.update(result)
                for prompt, rows in _per_prompt(call.prompts, call.batch):
                    self.buffer.append(Group(prompt, rows, min(int(v) for v in rows["weight_version"])))
        for sync in list(self.syncs):
            rank, ref = sync
            if sync not in self.syncs or not _is_ready(ref):  # gone with a replaced worker
                continue
            self.syncs.remove(sync)
            try:
                self.group.get([ref], "update_weights", ranks=[rank])
            except WorkerDiedError as err:
                self._replace_worker(rank, err)

    def _add_segments(self, call: _GenerateCall, result: dict) -> None:
        """Append each response's new segment; finished groups go to the buffer."""
        version = int(result["weight_version"])
        parts = zip(call.segments, result["tokens"], result["log_probs"], result["stopped"])
        for (response, budget), tokens, log_probs, stopped in parts:
            response.extend(tokens, log_probs, stopped, version, budget, self.segments.max_tokens)
            if not response.done:
                self.unfinished.append(response)
        for group in [g for g in self.open if g.finished()]:
            self.open.remove(group)
            batch = group.batch(self.segments.max_tokens, self.segments.pad_token_id)
            self.buffer.append(Group(group.prompt, batch, min(int(v) for v in batch["weight_version"])))

    def _replace_worker(self, rank: int, err: WorkerDiedError) -> None:
        """A dead worker's unfinished prompts go back to the front of the queue; a new worker
        takes its place with the latest weights (queued before any generate call)."""
        lost = [p for call in self.calls[rank] for p in call.prompts]
        # Partial rollouts keep the tokens sampled so far: only the lost segments are redone.
        self.unfinished.extendleft(reversed([r for call in self.calls[rank] for r, _ in call.segments]))
        self.calls[rank].clear()
        self.queue.extendleft(reversed(lost))
        self.syncs = [(r, ref) for r, ref in self.syncs if r != rank]
        self.on_worker_lost(err, len(lost))
        self.group.respawn(rank)
        if self.weights is not None:
            ref = self.group.call_rank_async(rank, "update_weights", self.weights, self.weight_version)
            self.syncs.append((rank, ref))

    def wait_for(self, refs: list[ray.ObjectRef]) -> None:
        """Block until ``refs`` (another role's call) are done, generating all the while."""
        remaining = list(refs)
        while True:
            self._harvest()
            self.top_up()
            _, remaining = ray.wait(remaining, num_returns=len(remaining), timeout=0)
            if not remaining:
                return
            ray.wait(self._watched() + remaining, num_returns=1)

    def take(self, trainer_version: int) -> tuple[list[Group], int]:
        """The oldest ``train_batch_size`` buffered groups that lag ``trainer_version`` by at
        most ``max_staleness``, waiting for generation as needed; and how many groups were
        dropped as too stale since the last take."""
        while True:
            self._harvest()
            self._drop_stale(trainer_version)
            if len(self.buffer) >= self.train_batch_size:
                break
            self.top_up()
            watched = self._watched()
            if not watched:
                raise RuntimeError(
                    f"async rollout: {len(self.buffer)} groups buffered, none being generated and no "
                    f"prompts left to draw; a step needs {self.train_batch_size}"
                )
            ray.wait(watched, num_returns=1)
        taken, self.buffer = self.buffer[: self.train_batch_size], self.buffer[self.train_batch_size :]
        self.top_up()  # the freed room goes to the workers at once
        dropped, self.stale_dropped = self.stale_dropped, 0
        return taken, dropped

    def _drop_stale(self, trainer_version: int) -> None:
        stale = [g for g in self.buffer if trainer_version - g.weight_version > self.max_staleness]
        if not stale:
            return
        self.buffer = [g for g in self.buffer if trainer_version - g.weight_version <= self.max_staleness]
        # Back to the front of the queue: these prompts are the oldest not yet trained.
        self.queue.extendleft(reversed([g.prompt for g in stale]))
        self.stale_dropped += len(stale)


def _per_prompt(prompts: list[Prompt], batch: BatchedDataDict) -> list[tuple[Prompt, BatchedDataDict]]:
    """``batch`` (each prompt's rows adjacent) split into one group of rows per prompt."""
    n = batch.size // len(prompts)
    return [(p, batch.select_indices(list(range(i * n, (i + 1) * n)))) for i, p in enumerate(prompts)]


def _is_ready(ref: ray.ObjectRef) -> bool:
    ready, _ = ray.wait([ref], num_returns=1, timeout=0)
    return bool(ready)
