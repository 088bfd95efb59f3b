"""Turn scored samples of one prompt into (chosen, rejected) pairs.

Strategies (``engine.pairing.strategy``):

* ``best_vs_worst``: the highest-scored sample against the lowest-scored one;
* ``margin``: every pair whose score difference exceeds ``margin``, largest gaps first;
* ``topk_vs_bottomk``: each of the ``k`` best against each of the ``k`` worst;
* ``judge``: a pairwise judge ``judge(prompt, answer_a, answer_b) -> 1 | -1 | 0`` compares
  candidate pairs directly instead of pointwise scores.

Ties (equal scores, or a judge answering 0) and identical answer texts never make a pair.
At most ``max_pairs_per_prompt`` pairs are kept per prompt. Everything is deterministic:
ordering breaks ties by sample index.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Any, Callable, Optional, Sequence

STRATEGIES = ("best_vs_worst", "margin", "topk_vs_bottomk", "judge")

Judge = Callable[[Any, str, str], int]

# Why a prompt produced no pair (keys of the summary's "no_pair_reasons").
NO_PAIR_SINGLE = "fewer than 2 distinct answers"
NO_PAIR_TIED = "all answers scored the same"
NO_PAIR_MARGIN = "no score gap above the margin"
NO_PAIR_JUDGE = "the judge called every comparison a tie"


@dataclass(frozen=True)
class Pair:
    chosen: int
    rejected: int
    gap: float


def _distinct(texts: Sequence[str]) -> list[int]:
    """Indices of the first occurrence of each distinct answer text."""
    seen: dict[str, int] = {}
    for i, text in enumerate(texts):
        seen.setdefault(text, i)
    return sorted(seen.values())


def pair_prompt(
    texts: Sequence[str],
    scores: Optional[Sequence[float]],
    strategy: str,
    margin: float = 0.0,
    k: int = 1,
    max_pairs: int = 1,
    judge: Optional[Judge] = None,
    prompt: Any = None,
) -> tuple[list[Pair], Optional[str]]:
    """Pairs for one prompt's samples, or ``([], reason)`` when none qualifies."""
    if strategy not in STRATEGIES:
        raise ValueError(f"engine.pairing.strategy '{strategy}' is unknown: use one of {', '.join(STRATEGIES)}")
    if max_pairs < 1:
        raise ValueError(f"engine.pairing.max_pairs_per_prompt must be >= 1, got {max_pairs}")
    candidates = _distinct(texts)
    if len(candidates) < 2:
        return [], NO_PAIR_SINGLE
    if strategy == "judge":
        return _judge_pairs(texts, candidates, judge, max_pairs, prompt)
    if scores is None:
        raise ValueError(f"pairing strategy '{strategy}' needs scores; run the score stage first")
    if len({scores[i] for i in candidates}) == 1:
        return [], NO_PAIR_TIED
    # Best first; equal scores keep sample order so results never depend on sort stability.
    ranked = sorted(candidates, key=lambda i: (-scores[i], i))
    if strategy == "best_vs_worst":
        pairs = [Pair(ranked[0], ranked[-1], scores[ranked[0]] - scores[ranked[-1]])]
    elif strategy == "topk_vs_bottomk":
        top, bottom = ranked[:k], ranked[::-1][:k]
        pairs = [Pair(c, r, scores[c] - scores[r]) for c in top for r in bottom if c != r]
    else:
        pairs = [Pair(c, r, scores[c] - scores[r]) for c, r in combinations(ranked, 2)]
    pairs = [p for p in pairs if p.gap > margin]
    if not pairs:
        return [], NO_PAIR_MARGIN
    pairs.sort(key=lambda p: (-p.gap, p.chosen, p.rejected))
    return pairs[:max_pairs], None


def _judge_pairs(texts, candidates, judge, max_pairs, prompt) -> tuple[list[Pair], Optional[str]]:
    if judge is None:
        raise ValueError("pairing strategy 'judge' needs engine.pairing.judge.path/name")
    pairs = []
    for a, b in combinations(candidates, 2):
        verdict = int(judge(prompt, texts[a], texts[b]))
        if verdict > 0:
            pairs.append(Pair(a, b, 1.0))
        elif verdict < 0:
            pairs.append(Pair(b, a, 1.0))
        if len(pairs) >= max_pairs:
            break
    return (pairs, None) if pairs else ([], NO_PAIR_JUDGE)
