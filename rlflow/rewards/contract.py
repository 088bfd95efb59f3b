"""What a reward function must accept and return, checked where a mistake can be named.

A reward function is called with keyword arguments ``data_source``, ``solution_str``,
``ground_truth`` and ``extra_info`` and returns a number or a dict with a numeric ``"score"``
(plus extra numbers, logged as ``reward/<key>``). Rows whose ``reward_model.ground_truth`` is
null are refused unless the scorer says it needs none::

    def compute_score(data_source, solution_str, ground_truth, extra_info=None):
        return float(len(solution_str) < 100)

    compute_score.needs_ground_truth = False

The driver checks the signature and the first rows before any worker starts; the reward
worker checks every row and every returned value.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Mapping
from typing import Any, Callable, Optional

from rlflow.errors import RewardError
from rlflow.rewards import registry

CALL_KEYWORDS = ("data_source", "solution_str", "ground_truth", "extra_info")


def describe(fn: Callable[..., Any]) -> str:
    """``name`` (and the file that defines it) of a reward function, for messages."""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
    code = getattr(fn, "__code__", None)
    return f"{name!r} in {code.co_filename!r}" if code is not None else repr(name)


def _leaves(fn: Callable[..., Any]) -> list[Callable[..., Any]]:
    # A CombinedReward calls each component with the same keyword arguments.
    components = getattr(fn, "components", None)
    return [c[1] for c in components] if isinstance(components, list) else [fn]


def check_signature(fn: Callable[..., Any]) -> None:
    """Raise ``RewardError`` unless ``fn`` (each component of a combination) accepts the
    keyword arguments the reward worker passes."""
    for leaf in _leaves(fn):
        try:
            signature = inspect.signature(leaf)
        except (TypeError, ValueError):  # a builtin or C callable: nothing to check
            continue
        try:
            signature.bind(**dict.fromkeys(CALL_KEYWORDS))
        except TypeError as exc:
            raise RewardError(
                f"reward function {describe(leaf)} cannot be called as "
                f"fn(data_source, solution_str, ground_truth, extra_info) ({exc}): give it that "
                "signature (extra_info may default to None; **kwargs also works)"
            ) from None


def row_problem(fn: Callable[..., Any], data_source: Any, ground_truth: Any) -> Optional[str]:
    """Why ``fn`` cannot score a row of ``data_source`` with ``ground_truth``, or None."""
    for leaf in _leaves(fn):
        if leaf is registry.default_compute_score:
            scorer = registry.scorer_for(data_source)
            if scorer is None:
                return (
                    f"data_source {data_source!r} has no reward scorer (known: "
                    f"{', '.join(registry.registered_data_sources())}): set reward.custom_fn.path/name "
                    "to your own compute_score, or fix the data_source"
                )
        else:
            scorer = leaf
        if ground_truth is None and getattr(scorer, "needs_ground_truth", True):
            return (
                f"reward_model.ground_truth is null, and the scorer {describe(scorer)} needs one: "
                "fill it in, or mark a scorer that needs none with fn.needs_ground_truth = False"
            )
    return None


def _is_number(value: Any) -> bool:
    if isinstance(value, numbers.Real):
        return True
    # a one-element tensor (torch is imported by whoever returns one)
    return hasattr(value, "numel") and hasattr(value, "item") and value.numel() == 1


def check_result(fn: Callable[..., Any], result: Any) -> None:
    """Raise ``RewardError`` unless ``result`` is a number or a dict with a numeric score."""
    if _is_number(result):
        return
    if isinstance(result, Mapping) and "score" in result and _is_number(result["score"]):
        bad = [k for k, v in result.items() if not _is_number(v)]
        if not bad:
            return
        what = f"a dict whose {bad[0]!r} entry is a {type(result[bad[0]]).__name__}"
    elif isinstance(result, Mapping):
        what = f"a dict without a numeric 'score' (keys: {sorted(map(str, result))})"
    else:
        what = f"a {type(result).__name__} ({result!r:.60})"
    raise RewardError(
        f"reward function {describe(fn)} returned {what}; it must return a float, or a dict "
        "with a float 'score' and optional extra float entries"
    )
