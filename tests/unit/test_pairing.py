"""Pairing strategies on hand-made scores."""

from __future__ import annotations

import pytest

from rlflow.data_engine.pairing import (
    NO_PAIR_JUDGE,
    NO_PAIR_MARGIN,
    NO_PAIR_SINGLE,
    NO_PAIR_TIED,
    pair_prompt,
)


def as_tuples(pairs):
    return [(p.chosen, p.rejected) for p in pairs]


TEXTS = ["a", "b", "c", "d"]
SCORES = [0.2, 0.9, 0.2, 0.5]


def test_best_vs_worst_picks_extremes_and_breaks_ties_by_index():
    pairs, reason = pair_prompt(TEXTS, SCORES, "best_vs_worst")
    assert reason is None
    # Lowest score 0.2 is shared by samples 0 and 2; the later one in rank order is the worst.
    assert as_tuples(pairs) == [(1, 2)]
    assert pairs[0].gap == pytest.approx(0.7)


def test_margin_pairs_all_above_margin_largest_gap_first_with_cap():
    pairs, _ = pair_prompt(TEXTS, SCORES, "margin", margin=0.25, max_pairs=10)
    # gaps: (1,0)=.7 (1,2)=.7 (1,3)=.4 (3,0)=.3 (3,2)=.3 ; (0,2)=0 is a tie
    assert as_tuples(pairs) == [(1, 0), (1, 2), (1, 3), (3, 0), (3, 2)]
    capped, _ = pair_prompt(TEXTS, SCORES, "margin", margin=0.25, max_pairs=2)
    assert as_tuples(capped) == [(1, 0), (1, 2)]
    none, reason = pair_prompt(TEXTS, SCORES, "margin", margin=0.8, max_pairs=10)
    assert none == [] and reason == NO_PAIR_MARGIN


def test_topk_vs_bottomk():
    pairs, _ = pair_prompt(TEXTS, SCORES, "topk_vs_bottomk", k=2, max_pairs=10)
    # top2 = [1, 3], bottom2 = [2, 0]
    assert sorted(as_tuples(pairs)) == [(1, 0), (1, 2), (3, 0), (3, 2)]


def test_ties_and_duplicates_never_pair():
    pairs, reason = pair_prompt(["x", "y", "z"], [1.0, 1.0, 1.0], "best_vs_worst")
    assert pairs == [] and reason == NO_PAIR_TIED
    pairs, reason = pair_prompt(["same", "same"], [1.0, 0.0], "best_vs_worst")
    assert pairs == [] and reason == NO_PAIR_SINGLE
    # The duplicate of the best answer is ignored; the pair uses distinct texts.
    pairs, _ = pair_prompt(["7", "7", "3"], [1.0, 1.0, 0.0], "margin", max_pairs=5)
    assert as_tuples(pairs) == [(0, 2)]


def test_judge_compares_pairs_and_drops_ties():
    def judge(prompt, a, b):
        assert prompt == "p"
        return 0 if {a, b} == {"a", "c"} else (1 if a < b else -1)

    pairs, reason = pair_prompt(["c", "a", "b"], None, "judge", max_pairs=10, judge=judge, prompt="p")
    assert reason is None
    # (c,a) tie; (c,b): "c" > "b" -> -1 -> b over c; (a,b): a over b
    assert as_tuples(pairs) == [(2, 0), (1, 2)]
    pairs, reason = pair_prompt(["a", "c"], None, "judge", judge=judge, prompt="p")
    assert pairs == [] and reason == NO_PAIR_JUDGE


def test_errors():
    with pytest.raises(ValueError, match="engine.pairing.strategy"):
        pair_prompt(TEXTS, SCORES, "best_of")
    with pytest.raises(ValueError, match="max_pairs_per_prompt"):
        pair_prompt(TEXTS, SCORES, "margin", max_pairs=0)
    with pytest.raises(ValueError, match="judge"):
        pair_prompt(TEXTS, None, "judge")
