"""Weighted sums of reward functions (e.g. correctness + format + length penalty).

Every component has the registry's signature ``fn(data_source, solution_str, ground_truth,
extra_info=None)`` and returns a float or a dict with a ``"score"`` entry plus extra values.
The combination returns one dict::

    {"score": sum_i weight_i * score_i,   # what the advantage estimator sees
     "<name_i>": score_i,                 # each component's own (unweighted) score
     "<name_i>/<key>": value, ...}        # each component's extra values, prefixed

The reward worker logs every non-``score`` entry as a per-sample metric.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rlflow.errors import ConfigError, RewardError
from rlflow.rewards.registry import default_compute_score, registered_data_sources
from rlflow.rewards.registry import scorer_for as registry_scorer

RewardFn = Callable[..., "float | dict[str, Any]"]


def _component_name(fn: RewardFn) -> str:
    name = getattr(fn, "__name__", None)
    if isinstance(name, str) and name and name != "<lambda>":
        return name
    raise ConfigError(
        f"cannot name reward component {fn!r:.80}; pass it as (name, fn, weight) or give the spec a 'label'"
    )


def _check_weight(name: str, weight: Any) -> float:
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(float(weight)):
        raise ConfigError(f"reward component {name!r}: weight must be a finite number, got {weight!r}")
    return float(weight)


class CombinedReward:
    """``score = sum_i weight_i * component_i(...)``, with per-component scores and extras.

    Args:
        components: ``(fn, weight)`` or ``(name, fn, weight)`` tuples. A component's name is
            its function's ``__name__`` unless given; names must be unique and not ``score``.

    Calling it with ``(data_source, solution_str, ground_truth, extra_info=None)`` calls every
    component with those keyword arguments and returns the dict described in the module
    docstring. A component returning a dict without ``score``, or a non-numeric score, raises
    ``RewardError`` naming the component.
    """

    def __init__(self, components: Sequence[tuple[Any, ...]]) -> None:
        if isinstance(components, (str, bytes)) or not isinstance(components, Sequence) or not components:
            raise ConfigError(
                "CombinedReward needs a non-empty list of (fn, weight) or (name, fn, weight) tuples"
            )
        self.components: list[tuple[str, RewardFn, float]] = []
        for n, entry in enumerate(components):
            if not isinstance(entry, tuple) or len(entry) not in (2, 3):
                raise ConfigError(
                    f"reward component {n} is {entry!r:.80}; give (fn, weight) or (name, fn, weight)"
                )
            name, fn, weight = entry if len(entry) == 3 else (None, *entry)
            if not callable(fn):
                raise ConfigError(f"reward component {n}: {fn!r:.80} is not callable")
            name = _component_name(fn) if name is None else name
            if not isinstance(name, str) or not name or name == "score" or "/" in name:
                raise ConfigError(
                    f"reward component {n}: name {name!r} must be a non-empty str other than 'score', without '/'"
                )
            if any(name == existing for existing, _, _ in self.components):
                raise ConfigError(
                    f"two reward components are named {name!r}; give one another name (spec 'label')"
                )
            self.components.append((name, fn, _check_weight(name, weight)))

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.components]

    def __call__(
        self,
        data_source: str,
        solution_str: str,
        ground_truth: Any,
        extra_info: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        total = 0.0
        out: dict[str, Any] = {}
        for name, fn, weight in self.components:
            result = fn(
                data_source=data_source,
                solution_str=solution_str,
                ground_truth=ground_truth,
                extra_info=extra_info,
            )
            if isinstance(result, Mapping):
                if "score" not in result:
                    raise RewardError(
                        f"reward component {name!r} returned a dict without 'score' (keys: {sorted(result)}); "
                        "return a float or a dict with a 'score' entry"
                    )
                score = result["score"]
                extras = {k: v for k, v in result.items() if k != "score"}
            else:
                score, extras = result, {}
            if isinstance(score, bool) or not isinstance(score, numbers.Real):
                raise RewardError(
                    f"reward component {name!r} returned score {score!r:.80} (a {type(score).__name__}); "
                    "it must be a number"
                )
            out[name] = float(score)
            for key, value in extras.items():
                out[f"{name}/{key}"] = value
            total += weight * float(score)
        return {"score": total, **out}

    def __repr__(self) -> str:
        parts = ", ".join(f"{name}*{weight:g}" for name, _, weight in self.components)
        return f"CombinedReward({parts})"


def _registry_component(data_source: str | None) -> RewardFn:
    """The built-in registry: by the row's data_source, or always the scorer of one data_source."""
    if data_source is None:
        return default_compute_score
    if data_source not in registered_data_sources():
        raise ConfigError(
            f"reward spec names data_source {data_source!r}, which has no registered scorer "
            f"(known: {', '.join(registered_data_sources())}); fix the name or give a 'path'"
        )
    fixed_source = data_source

    def scorer(data_source: str, solution_str: str, ground_truth: Any, extra_info: Any = None) -> Any:
        # Scored by the configured data_source's scorer, whatever the row's data_source is.
        return default_compute_score(fixed_source, solution_str, ground_truth, extra_info)

    scorer.__name__ = data_source
    scorer.needs_ground_truth = getattr(registry_scorer(data_source), "needs_ground_truth", True)
    return scorer


_SPEC_KEYS = {"path", "name", "weight", "label"}


def build_reward_fn(specs: Sequence[Any]) -> CombinedReward:
    """Build a ``CombinedReward`` from config-style specs.

    Each spec is a Python callable (weight 1, named by ``__name__``) or a mapping with keys

    * ``path``: a .py file defining the function, or ``None`` / absent for the built-in
      registry (``rlflow.rewards.registry``);
    * ``name``: the function in ``path``; with the registry, a ``data_source`` whose scorer
      to always use, or ``None`` to dispatch on each row's ``data_source``;
    * ``weight``: a number (default 1.0);
    * ``label``: the component's name in the result (default: ``name``, or ``"default"``
      for the registry dispatch).
    """
    from rlflow.data.custom_loading import load_object

    if isinstance(specs, (str, bytes, Mapping)) or not isinstance(specs, Sequence) or len(specs) == 0:
        raise ConfigError(
            "reward specs must be a non-empty list of callables or {path, name, weight} mappings, "
            f"got {specs!r:.100}"
        )
    components: list[tuple[str, RewardFn, float]] = []
    for n, spec in enumerate(specs):
        if callable(spec) and not isinstance(spec, Mapping):
            components.append((_component_name(spec), spec, 1.0))
            continue
        if not isinstance(spec, Mapping):
            raise ConfigError(
                f"reward spec {n} is {spec!r:.80}; give a callable or a {{path, name, weight}} mapping"
            )
        unknown = sorted(set(spec) - _SPEC_KEYS)
        if unknown:
            raise ConfigError(f"reward spec {n} has unknown keys {unknown}; allowed: {sorted(_SPEC_KEYS)}")
        path, name = spec.get("path"), spec.get("name")
        if path:
            if not name:
                raise ConfigError(
                    f"reward spec {n}: 'name' is required with 'path' {path!r} (the function to load)"
                )
            fn = load_object(path, name)
            if not callable(fn):
                raise ConfigError(f"reward spec {n}: {name!r} in {path!r} is not callable")
        else:
            if name is not None and not isinstance(name, str):
                raise ConfigError(
                    f"reward spec {n}: registry 'name' must be a data_source string or null, got {name!r}"
                )
            fn = _registry_component(name)
        label = spec.get("label") or name or "default"
        components.append((label, fn, _check_weight(label, spec.get("weight", 1.0))))
    return CombinedReward(components)


def resolve_reward_fn(reward_cfg: Any, score_fn: RewardFn | None = None) -> RewardFn:
    """The reward function a run uses: ``score_fn`` (a Python callable) if given, else
    ``reward.fns`` (several, weighted), ``reward.custom_fn`` or the built-in registry."""
    from omegaconf import OmegaConf

    from rlflow.data.custom_loading import load_object

    if score_fn is not None:
        return score_fn
    if reward_cfg.fns:  # a ListConfig (the driver's config) or a list (a worker's typed config)
        fns = reward_cfg.fns
        return build_reward_fn(OmegaConf.to_container(fns) if OmegaConf.is_config(fns) else list(fns))
    if reward_cfg.custom_fn.path:
        return load_object(reward_cfg.custom_fn.path, reward_cfg.custom_fn.name)
    return default_compute_score
