"""Batch arithmetic for every role, in one unit convention.

Units:

* **prompt**: one dataset row. ``data.train_batch_size`` and ``<role>.ppo_mini_batch_size``
  count prompts, because that is what a user picks when sizing a run.
* **response**: one sampled answer; a prompt yields ``rollout.n`` responses, and a response
  is one row of every batch after generation. Everything a worker is handed counts
  responses: its shard, ``*_micro_batch_size_per_worker`` and the ``mini_batch_size``
  argument of an update.
* **token**: ``max_tokens_per_microbatch`` counts the tokens one forward pass of one worker
  computes: rows x the longest row (rounded up) for dynamic batching, the sum of the rows'
  lengths for a packed row.

Shards are contiguous; a batch that does not divide by the number of workers is padded with
copies of its last rows so that every rank runs the same number of forward passes (FSDP's
collectives need that), and the copies' outputs are dropped again.
"""

from __future__ import annotations

from collections.abc import Callable


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def largest_divisor_at_most(n: int, cap: int) -> int:
    """The largest divisor of ``n`` that is ``<= cap`` (at least 1)."""
    for d in range(max(1, min(n, cap)), 0, -1):
        if n % d == 0:
            return d
    return 1


def mini_batch_per_worker(mini_batch_prompts: int, n: int, num_workers: int) -> int:
    """Responses one worker trains per optimiser step."""
    return mini_batch_prompts * n // num_workers


def optimizer_steps(train_batch_prompts: int, mini_batch_prompts: int, epochs: int, training_steps: int) -> int:
    """Optimiser steps over ``training_steps`` trainer steps (at least 1: schedules need one)."""
    return max(1, training_steps * (train_batch_prompts // mini_batch_prompts) * epochs)


def shard_bounds(size: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` ranges; the first ``size % shards`` ranges are one longer."""
    base, extra = divmod(size, shards)
    bounds, start = [], 0
    for rank in range(shards):
        end = start + base + (1 if rank < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def padding_indices(size: int, pad: int) -> list[int]:
    """Rows copied to pad a batch of ``size`` by ``pad`` rows: the last ``pad`` rows in order
    (cycling when ``pad > size``)."""
    return [(size - pad + i) % size for i in range(pad)]


def splittable_group_count(available: int, group_size: int, roles: list[tuple[int, int, int]]) -> int:
    """Largest ``k <= available`` such that ``k * group_size`` responses can be trained by every
    role in ``roles``, each given as ``(num_workers, mini_batch_per_worker,
    micro_batch_per_worker)``: equal shards per rank, and mini-batches (the last one may be
    shorter) that each split into whole micro-batches of ``min(micro, mini-batch)`` rows.
    0 when no ``k >= 1`` works."""
    for k in range(available, 0, -1):
        responses = k * group_size
        if all(_splittable(responses, *shape) for shape in roles):
            return k
    return 0


def _splittable(responses: int, workers: int, mini: int, micro: int) -> bool:
    if responses % workers:
        return False
    per_rank = responses // workers
    sizes = {min(mini, per_rank), per_rank % mini} - {0}
    return all(size % min(micro, size) == 0 for size in sizes)


def balanced_halves(items: list[int], weight: Callable[[int], int]) -> tuple[list[int], list[int]]:
    """Split ``items`` in two of similar total weight: heaviest first, each to the lighter half."""
    halves: list[list[int]] = [[], []]
    loads = [0, 0]
    for i in sorted(items, key=lambda i: (-weight(i), i)):
        h = 0 if loads[0] <= loads[1] else 1
        halves[h].append(i)
        loads[h] += weight(i)
    return sorted(halves[0]), sorted(halves[1])


def split_to_count(
    groups: list[list[int]],
    count: int,
    cost: Callable[[list[int]], object],
    halve: Callable[[list[int]], tuple[list[int], list[int]]],
) -> list[list[int]]:
    """Grow ``groups`` (micro-batches or bins of row indices) to ``count`` entries.

    The costliest group with at least two rows (the first on ties) is replaced in place by its
    two ``halve`` parts, which never cost more than it did, so a token cap still holds. When
    every group holds a single row, empty groups are appended. Ranks use this to agree on one
    number of forward passes.
    """
    groups = [list(g) for g in groups]
    while len(groups) < count:
        splittable = [k for k, g in enumerate(groups) if len(g) >= 2]
        if not splittable:
            groups.append([])
            continue
        k = max(splittable, key=lambda k: (cost(groups[k]), -k))
        groups[k : k + 1] = list(halve(groups[k]))
    return groups
