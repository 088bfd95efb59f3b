"""Dispatch rule-based scoring by a row's ``data_source``.

Built-in scorers:

=====================================================================  ==========================
data_source                                                            scorer
=====================================================================  ==========================
``arithmetic``                                                         :mod:`.arithmetic`
``openai/gsm8k``, ``gsm8k``                                            :mod:`.gsm8k` (strict)
``DigitalLearningGmbH/MATH-lighteval``, ``HuggingFaceH4/MATH-500``,    :mod:`.math`
``math``
``code``                                                               :mod:`.code` (runs tests)
=====================================================================  ==========================

A scorer is a callable ``fn(solution_str, ground_truth)`` returning a float (or a dict with
a ``"score"`` entry plus extra metrics); if it declares an ``extra_info`` parameter (or
``**kwargs``) it also receives the row's ``extra_info``. A scorer that does not use the
ground truth says so with ``fn.needs_ground_truth = False`` (see ``rlflow.rewards.contract``). ``register_scorer`` adds scorers in
the current process only: a reward worker running in another Ray process does not see them,
so for distributed runs point ``reward.custom_fn.path/name`` at a file instead.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from rlflow.rewards import arithmetic, code, gsm8k
from rlflow.rewards import math as math_scorer

Scorer = Callable[..., "float | dict[str, Any]"]

_BUILTIN: dict[str, Scorer] = {
    "arithmetic": arithmetic.compute_score,
    "openai/gsm8k": gsm8k.compute_score,
    "gsm8k": gsm8k.compute_score,
    "DigitalLearningGmbH/MATH-lighteval": math_scorer.compute_score,
    "HuggingFaceH4/MATH-500": math_scorer.compute_score,
    "math": math_scorer.compute_score,
    "code": code.compute_score,
}

_SCORERS: dict[str, Scorer] = dict(_BUILTIN)


@functools.lru_cache(maxsize=None)
def _accepts_extra_info(fn: Scorer) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "extra_info" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def register_scorer(data_source: str, fn: Scorer, *, overwrite: bool = False) -> None:
    """Use ``fn`` for rows whose ``data_source`` equals ``data_source``.

    Raises ValueError if ``data_source`` already has a scorer and ``overwrite`` is False.
    """
    if not isinstance(data_source, str) or not data_source:
        raise TypeError(f"register_scorer: data_source must be a non-empty str, got {data_source!r}")
    if not callable(fn):
        raise TypeError(f"register_scorer: fn for {data_source!r} must be callable, got {fn!r}")
    if data_source in _SCORERS and not overwrite:
        raise ValueError(
            f"register_scorer: data_source {data_source!r} already has a scorer; "
            "pass overwrite=True to replace it"
        )
    _SCORERS[data_source] = fn


def unregister_scorer(data_source: str) -> None:
    """Remove a user scorer; a built-in data_source goes back to its built-in scorer."""
    if data_source in _BUILTIN:
        _SCORERS[data_source] = _BUILTIN[data_source]
    else:
        _SCORERS.pop(data_source, None)


def registered_data_sources() -> list[str]:
    """All data_source names that have a scorer, sorted."""
    return sorted(_SCORERS)


def scorer_for(data_source: Any) -> Scorer | None:
    """The scorer registered for ``data_source``, or None."""
    return _SCORERS.get(data_source) if isinstance(data_source, str) else None


def default_compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: dict[str, Any] | None = None,
) -> float | dict[str, Any]:
    """Score one response with the scorer registered for ``data_source``.

    Raises ValueError for a data_source with no scorer.
    """
    fn = scorer_for(data_source)
    if fn is None:
        raise ValueError(
            f"no reward scorer for data_source={data_source!r} (known: "
            f"{', '.join(registered_data_sources())}); set reward.custom_fn.path/name to your "
            "own compute_score, or call rlflow.rewards.register_scorer"
        )
    if _accepts_extra_info(fn):
        return fn(solution_str, ground_truth, extra_info=extra_info)
    return fn(solution_str, ground_truth)
