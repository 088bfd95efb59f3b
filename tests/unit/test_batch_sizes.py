"""The shared batch arithmetic: unit conversions and the halving that aligns step counts."""

from __future__ import annotations

from rlflow.data.batch_sizes import (
    balanced_halves,
    divisors,
    mini_batch_per_worker,
    optimizer_steps,
    round_up,
    split_to_count,
)


def test_unit_conversions():
    # 32 prompts per mini-batch x 8 responses each over 2 workers: 128 responses per worker.
    assert mini_batch_per_worker(32, 8, 2) == 128
    # 64 prompts per step in mini-batches of 16, 2 epochs, 10 steps: 4 * 2 * 10 optimiser steps.
    assert optimizer_steps(64, 16, 2, 10) == 80
    assert optimizer_steps(64, 16, 1, 0) == 1
    assert round_up(17, 8) == 24 and round_up(16, 8) == 16
    assert divisors(12) == [1, 2, 3, 4, 6, 12]


def test_balanced_halves_split_by_weight():
    weights = {0: 10, 1: 1, 2: 9, 3: 2}
    a, b = balanced_halves([0, 1, 2, 3], weights.__getitem__)
    assert sorted(a + b) == [0, 1, 2, 3]
    assert abs(sum(weights[i] for i in a) - sum(weights[i] for i in b)) <= 2


def test_split_to_count_halves_the_costliest_in_place_then_appends_empty_groups():
    lengths = [5, 5, 1, 1, 1, 1]
    cost = lambda rows: sum(lengths[i] for i in rows)  # noqa: E731
    halve = lambda rows: balanced_halves(rows, lengths.__getitem__)  # noqa: E731
    out = split_to_count([[0, 1], [2, 3, 4, 5]], 3, cost, halve)
    # [0, 1] costs 10 > 4: it is the one split, in place.
    assert out == [[0], [1], [2, 3, 4, 5]]
    out = split_to_count([[0], [1]], 4, cost, halve)
    assert out == [[0], [1], [], []]
    assert split_to_count([[0, 1]], 1, cost, halve) == [[0, 1]]
