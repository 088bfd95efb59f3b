"""Compose a run's config from the schema, a recipe and command-line style overrides.

Recipes are YAML files in the top-level ``recipes/`` folder (shipped inside the wheel too).
They are registered in Hydra's ConfigStore as the ``recipe`` group, so ``+recipe=grpo`` is an
ordinary Hydra group override and everything else Hydra offers for overrides keeps working.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from hydra import compose, initialize
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rlflow.config.schema import RLFlowConfig
from rlflow.errors import ConfigError
from rlflow.utils.bundled import bundled_dir

PRIMARY_CONFIG = "rlflow"


def recipe_dir(subdir: Optional[str] = None) -> Path:
    """The training recipes, or with ``subdir`` another tool's recipes (e.g. "data_engine")."""
    root = bundled_dir("recipes")
    return root / subdir if subdir else root


def available_recipes(subdir: Optional[str] = None) -> list[str]:
    return sorted(p.stem for p in recipe_dir(subdir).glob("*.yaml"))


def _register(schema: type, subdir: Optional[str]) -> None:
    store = ConfigStore.instance()
    node = OmegaConf.structured(schema)
    # Free-form dict fields (env vars, custom resources, chat-template kwargs) take any key;
    # everything else stays strict.
    for path in _dict_fields(schema):
        OmegaConf.set_struct(OmegaConf.select(node, path), False)
    store.store(name=PRIMARY_CONFIG, node=node)
    # The group holds exactly this tool's recipes (training and data-engine recipes share the
    # +recipe=NAME syntax but not their schema).
    store.repo.pop("recipe", None)
    for name in available_recipes(subdir):
        node = OmegaConf.load(recipe_dir(subdir) / f"{name}.yaml")
        store.store(group="recipe", name=name, node=node, package="_global_")


def _dict_fields(schema: type, prefix: str = "") -> list[str]:
    paths = []
    for name, hint in typing.get_type_hints(schema).items():
        if dataclasses.is_dataclass(hint):
            paths += _dict_fields(hint, f"{prefix}{name}.")
        elif typing.get_origin(hint) in (dict, typing.Dict):
            paths.append(f"{prefix}{name}")
    return paths


def _split_recipe(overrides: Sequence[str], recipe: Optional[str]) -> tuple[Optional[str], list[str]]:
    """Pull the recipe choice out of the overrides so it can be checked before Hydra sees it."""
    rest = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key.lstrip("+") == "recipe":
            recipe = value
        else:
            rest.append(item)
    return recipe, rest


def compose_config(
    recipe: Optional[str] = None,
    overrides: Iterable[str] = (),
    schema: type = RLFlowConfig,
    recipe_subdir: Optional[str] = None,
) -> DictConfig:
    """Build the typed config for a run.

    ``recipe`` is a name from ``recipes/`` (``overrides`` may also carry ``+recipe=NAME``);
    ``overrides`` are Hydra overrides such as ``"rollout.n=8"``. Raises ConfigError with a
    one-line message on an unknown recipe, unknown key or wrongly typed value.
    """
    recipe, rest = _split_recipe(list(overrides), recipe)
    names = available_recipes(recipe_subdir)
    if recipe is not None and recipe not in names:
        raise ConfigError(
            f"unknown recipe '{recipe}': available recipes are {', '.join(names)} "
            f"(files in {recipe_dir(recipe_subdir)}); pick one with +recipe=NAME"
        )
    _register(schema, recipe_subdir)
    hydra_overrides = ([f"+recipe={recipe}"] if recipe else []) + rest
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize(version_base=None, config_path=None):
            cfg = compose(config_name=PRIMARY_CONFIG, overrides=hydra_overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(_one_line(exc, rest)) from exc
    finally:
        GlobalHydra.instance().clear()
    # "+key=value" adds keys even in struct mode, so compare against the schema explicitly.
    _reject_unknown_keys(cfg, schema, prefix="")
    if schema is RLFlowConfig:
        _epochs_beat_recipe_steps(cfg, rest)
    return cfg


def _override_keys(overrides: Sequence[str]) -> set[str]:
    return {item.partition("=")[0].lstrip("+~") for item in overrides}


def _epochs_beat_recipe_steps(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """``trainer.total_epochs`` given on the command line wins over a recipe's
    ``trainer.total_steps``: the recipe's step count is a default for the demo, not a cap the
    user asked for. A ``trainer.total_steps`` the user gives wins over both (as verl's
    ``total_training_steps`` wins over ``total_epochs``); the trainer says so in its log."""
    keys = _override_keys(overrides)
    if "trainer.total_epochs" in keys and "trainer.total_steps" not in keys:
        cfg.trainer.total_steps = None


def _reject_unknown_keys(node: Any, schema: type, prefix: str) -> None:
    declared = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys():
        name = f"{prefix}{key}"
        if key not in declared:
            raise ConfigError(
                f"unknown config key '{name}': check the spelling against "
                f"`python -m rlflow.main --cfg` (the full config with defaults)"
            )
        field_type = typing.get_type_hints(schema)[key]
        if dataclasses.is_dataclass(field_type):
            _reject_unknown_keys(node[key], field_type, prefix=f"{name}.")


def _one_line(exc: BaseException, overrides: Sequence[str] = ()) -> str:
    """Hydra and OmegaConf messages span several lines; keep the part that names the key."""
    text = str(exc).strip()
    cause = exc.__cause__
    if cause is not None and isinstance(cause, OmegaConfBaseException):
        text = str(cause).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    key_line = next((ln for ln in text.splitlines() if ln.strip().startswith("full_key:")), None)
    if "not in struct" in text or "Key '" in first and "not in" in first:
        key = key_line.split(":", 1)[1].strip() if key_line else first
        return (
            f"unknown config key '{key}': check the spelling against "
            f"`python -m rlflow.main --cfg` (the full config with defaults)"
        )
    key = key_line.split(":", 1)[1].strip() if key_line else None
    if key and "is not a ListConfig" in first:
        # e.g. data.train_files=train.parquet: Hydra needs brackets for a list
        given = next((o.partition("=")[2] for o in overrides if o.partition("=")[0].lstrip("+~") == key), "VALUE")
        return f"{key} takes a list, not a single value: write {key}=[{given}] (several: {key}=[a,b])"
    if key and key not in first:
        first = f"{first} (config key '{key}')"
    return first


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
