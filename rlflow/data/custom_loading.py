"""Load user code (datasets, packers, reward functions) from explicitly configured .py files.

Only paths a user wrote into the config are imported; nothing is discovered or scanned. A
loaded module is registered with Ray's cloudpickle to be pickled by value, so its objects (a
reward function, a packer) can be sent to Ray workers on nodes that do not have the file;
workers that load by ``(path, name)`` themselves need the file on their node (ship it with the
job's ``working_dir``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

from rlflow.data.packer import ChatDataPacker, DataPacker
from rlflow.errors import ConfigError

# (absolute path, modification time) -> module: loading the same unchanged file twice returns
# the same objects, so classes compare equal and isinstance checks keep working.
_MODULES: dict[tuple[str, int], ModuleType] = {}
_LOCK = threading.Lock()


def _load_module(path: str) -> ModuleType:
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ConfigError(f"custom code path must be the path of a .py file, got {path!r}")
    full = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.isfile(full):
        raise ConfigError(
            f"custom code file {os.fspath(path)!r} not found; give the path of an existing .py file"
        )
    if not full.endswith(".py"):
        raise ConfigError(
            f"custom code file {os.fspath(path)!r} is not a .py file; give the path of a Python source file"
        )
    key = (full, os.stat(full).st_mtime_ns)
    with _LOCK:
        module = _MODULES.get(key)
        if module is not None:
            return module
        digest = hashlib.sha1(full.encode()).hexdigest()[:12]
        stem = os.path.splitext(os.path.basename(full))[0]
        module_name = f"rlflow_user_code_{stem}_{digest}"
        spec = importlib.util.spec_from_file_location(module_name, full)
        if spec is None or spec.loader is None:
            raise ConfigError(f"custom code file {full!r} cannot be imported as a Python module")
        module = importlib.util.module_from_spec(spec)
        # Registered while it runs: dataclasses and pickling look the module up by name.
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(module_name, None)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ConfigError(
                f"importing custom code file {full!r} failed: {type(exc).__name__}: {first}; fix that file"
            ) from exc
        _pickle_by_value(module)
        _MODULES[key] = module
        return module


def _pickle_by_value(module: ModuleType) -> None:
    """Let Ray ship objects from ``module`` to workers that cannot import it by name."""
    try:
        from ray import cloudpickle
    except ImportError:  # Ray is a dependency of rlflow; tolerate its absence in tooling anyway
        return
    cloudpickle.register_pickle_by_value(module)


def load_object(path: str, name: str) -> Any:
    """Import ``name`` (a class, function or other object) from the Python file at ``path``.

    Raises ``ConfigError`` (a ``ValueError``) with one line when the file is missing, is not a
    ``.py`` file, fails to import, or does not define ``name``.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"custom object name must be a Python identifier, got {name!r}")
    module = _load_module(path)
    if not hasattr(module, name):
        public = sorted(n for n in vars(module) if not n.startswith("_"))
        raise ConfigError(
            f"{name!r} is not defined in {module.__file__!r} (it defines: {public}); fix the name"
        )
    return getattr(module, name)


def build_custom_dataset(
    path: str, name: str, config: Any, tokenizer: Any, files: Sequence[str] | str
) -> Any:
    """Instantiate a user dataset class (or factory) ``name`` from the file ``path``.

    Construction: ``cls(**kwargs)`` where ``kwargs`` are those of ``data_files=files``,
    ``tokenizer=tokenizer`` and ``config=config`` that the constructor declares (all three if
    it takes ``**kwargs``); then ``dataset.setup(config, tokenizer)`` if it defines ``setup``.
    The result must be map-style (``__len__`` and ``__getitem__``): the trainer keeps the
    position and picks rows by index.
    """
    factory = load_object(path, name)
    if not callable(factory):
        raise ConfigError(
            f"custom dataset {name!r} in {path!r} is a {type(factory).__name__}; it must be a class"
        )
    offered = {"data_files": files, "tokenizer": tokenizer, "config": config}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = offered
    else:
        kwargs = {k: v for k, v in offered.items() if k in params}
    dataset = factory(**kwargs)
    setup = getattr(dataset, "setup", None)
    if callable(setup):
        setup(config, tokenizer)
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise ConfigError(
            f"custom dataset {name!r} from {path!r} must define __len__ and __getitem__ "
            "(a map-style torch Dataset)"
        )
    return dataset


def resolve_packer(spec: Any = None, *, config: Any = None, tokenizer: Any = None) -> DataPacker:
    """Turn a packer spec into a ``DataPacker`` instance.

    ``spec`` may be ``None`` (the default ``ChatDataPacker``), a ``DataPacker`` instance, a
    ``DataPacker`` subclass (instantiated with no arguments), a ``(path, name)`` pair or a
    mapping ``{"path": ..., "name": ...}`` naming either of those in a .py file. When a
    ``tokenizer`` is given, ``packer.setup(config, tokenizer)`` is called before returning.
    """
    obj = spec
    if obj is None:
        obj = ChatDataPacker
    elif isinstance(obj, Mapping):
        unknown = sorted(set(obj) - {"path", "name"})
        if unknown or not obj.get("path") or not obj.get("name"):
            raise ConfigError(f"packer spec {dict(obj)!r} must have exactly the keys 'path' and 'name'")
        obj = load_object(obj["path"], obj["name"])
    elif isinstance(obj, (tuple, list)):
        if len(obj) != 2 or not all(isinstance(x, (str, os.PathLike)) for x in obj):
            raise ConfigError(f"packer spec {obj!r} must be a (path, name) pair of strings")
        obj = load_object(os.fspath(obj[0]), str(obj[1]))
    if isinstance(obj, type) and issubclass(obj, DataPacker):
        obj = obj()
    if not isinstance(obj, DataPacker):
        raise TypeError(
            f"packer must be a DataPacker instance or subclass (or a (path, name) naming one), "
            f"got {obj!r:.100}; subclass rlflow.data.packer.DataPacker"
        )
    if tokenizer is not None:
        obj.setup(config, tokenizer)
    return obj
