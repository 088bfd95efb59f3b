"""Locate the folders rlflow ships next to the package (recipes, data preprocessing scripts).

Two layouts are supported:

* installed wheel: ``rlflow/_bundled/recipes`` and ``rlflow/_bundled/data_preprocess``;
* source checkout (editable install): ``<repo>/recipes`` and ``<repo>/examples/data_preprocess``.

The wheel location is checked first so that an installed package never picks up a stray
checkout that happens to sit next to it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import rlflow

_PACKAGE_DIR = Path(rlflow.__file__).resolve().parent

# name -> (location inside an installed wheel, location inside a source checkout)
_LOCATIONS: dict[str, tuple[Path, Path]] = {
    "recipes": (
        _PACKAGE_DIR / "_bundled" / "recipes",
        _PACKAGE_DIR.parent / "recipes",
    ),
    "data_preprocess": (
        _PACKAGE_DIR / "_bundled" / "data_preprocess",
        _PACKAGE_DIR.parent / "examples" / "data_preprocess",
    ),
}

# Modules loaded from the bundled folder are registered under this prefix so repeated
# imports (e.g. from several call sites in one process) return the same module object.
_MODULE_PREFIX = "rlflow._bundled_data_preprocess"


class BundledAssetError(FileNotFoundError):
    """A bundled folder or script is missing from both the wheel and the source layout."""


def bundled_dir(name: str) -> Path:
    """Return the folder holding the bundled ``name`` ("recipes" or "data_preprocess").

    Raises:
        ValueError: ``name`` is not one of the known bundled folders.
        BundledAssetError: neither the wheel nor the source-checkout location exists.
    """
    if name not in _LOCATIONS:
        raise ValueError(f"bundled_dir(name={name!r}): unknown name; use one of {sorted(_LOCATIONS)}")
    wheel_path, source_path = _LOCATIONS[name]
    for candidate in (wheel_path, source_path):
        if candidate.is_dir():
            return candidate
    raise BundledAssetError(
        f"bundled folder {name!r} not found at {wheel_path} (wheel) or {source_path} "
        "(source checkout); reinstall rlflow or run from a full clone of the repository"
    )


def import_data_preprocess(module: str) -> ModuleType:
    """Import ``<data_preprocess>/<module>.py`` and return the module.

    The module is cached in ``sys.modules`` as ``rlflow._bundled_data_preprocess.<module>``,
    so it is executed once per process.
    """
    if not module or not module.isidentifier():
        raise ValueError(
            f"import_data_preprocess(module={module!r}): expected a script name such as 'arithmetic'"
        )
    qualified = f"{_MODULE_PREFIX}.{module}"
    cached = sys.modules.get(qualified)
    if cached is not None:
        return cached
    path = bundled_dir("data_preprocess") / f"{module}.py"
    if not path.is_file():
        raise BundledAssetError(
            f"data preprocessing script {module!r} not found at {path}; "
            "check the name (e.g. 'arithmetic') or reinstall rlflow"
        )
    spec = importlib.util.spec_from_file_location(qualified, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot build an import spec for {path}")
    loaded = importlib.util.module_from_spec(spec)
    # Registered before execution so dataclasses/pickling inside the script can find it.
    sys.modules[qualified] = loaded
    try:
        spec.loader.exec_module(loaded)
    except BaseException:
        sys.modules.pop(qualified, None)
        raise
    return loaded
