"""Checkpoint folders: atomic writes, discovery for resume, retention.

Layout under ``<output_dir>/checkpoints``::

    global_step_8/
        trainer_state.json     step, weight version, dataloader position, KL controller, ...
        driver_rng.pt          RNG states of the driver
        config.yaml            the resolved config of the run that wrote it
        actor/                 written by the actor workers (weights, optimiser, RNG per rank)
        critic/                (PPO only)
    latest_checkpointed_iteration.txt

A checkpoint is first written to ``.tmp-global_step_N-<id>`` and renamed only when every
part is on disk, so a crash while saving never leaves a folder that looks complete.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import uuid
from typing import Any, Callable, Optional

import numpy as np
import torch

from rlflow.errors import ConfigError, DiskFullError

STEP_DIR = re.compile(r"^global_step_(\d+)$")
LATEST_FILE = "latest_checkpointed_iteration.txt"
STATE_FILE = "trainer_state.json"
# Less free space than this after a failed write means the write failed for lack of it.
_NEARLY_FULL_BYTES = 1 << 20


def checkpoints_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints as (step, path), oldest first."""
    root = checkpoints_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = STEP_DIR.match(name)
        path = os.path.join(root, name)
        if match and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume_path(output_dir: str, resume_mode: str) -> Optional[str]:
    """``auto``: the newest complete checkpoint if any; ``disable``: none; else a path."""
    if resume_mode == "disable":
        return None
    if resume_mode == "auto":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = os.path.abspath(os.path.expanduser(resume_mode))
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise ConfigError(
            f"trainer.resume_mode='{resume_mode}' is not a checkpoint folder (no {STATE_FILE} in "
            f"{path}): use auto, disable, or a path like <output_dir>/checkpoints/global_step_N"
        )
    return path


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng(path: str) -> None:
    # Plain Python/numpy objects: pickled by torch.save, read back with weights_only=False only
    # from our own checkpoint folder (see load_rng).
    state = rng_state()
    state["python"] = [state["python"][0], list(state["python"][1]), state["python"][2]]
    numpy_state = state["numpy"]
    state["numpy"] = [numpy_state[0], torch.from_numpy(numpy_state[1].copy()), *numpy_state[2:]]
    torch.save(state, path)


def load_rng(path: str) -> None:
    # Every entry is a tensor, list, str, int or float, so the safe loader suffices.
    state = torch.load(path, weights_only=True)
    state["python"] = (state["python"][0], tuple(state["python"][1]), state["python"][2])
    numpy_state = state["numpy"]
    state["numpy"] = (numpy_state[0], numpy_state[1].numpy(), *numpy_state[2:])
    set_rng_state(state)


def save_checkpoint(
    output_dir: str,
    step: int,
    trainer_state: dict[str, Any],
    config_yaml: str,
    write_parts: Callable[[str], None],
    max_to_keep: Optional[int] = None,
) -> str:
    """Write ``global_step_<step>`` atomically. ``write_parts(tmp_dir)`` saves the workers'
    state (it must have finished writing when it returns)."""
    root = checkpoints_root(output_dir)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"global_step_{step}")
    tmp = os.path.join(root, f".tmp-global_step_{step}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    latest_tmp = os.path.join(root, f".tmp-{LATEST_FILE}.{uuid.uuid4().hex[:8]}")
    try:
        write_parts(tmp)
        save_rng(os.path.join(tmp, "driver_rng.pt"))
        with open(os.path.join(tmp, "config.yaml"), "w", encoding="utf-8") as f:
            f.write(config_yaml)
        # The state file is the completeness marker: written last, inside the temp folder.
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(trainer_state, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
        with open(latest_tmp, "w", encoding="utf-8") as f:
            f.write(str(step))
        os.replace(latest_tmp, os.path.join(root, LATEST_FILE))
    except BaseException as exc:
        # Measured before the partial files go: after an ENOSPC they fill the disk.
        full = _disk_full(exc, root)
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.exists(latest_tmp):
            os.remove(latest_tmp)
        if full:
            previous = list_checkpoints(output_dir)
            kept = f"the last complete checkpoint {previous[-1][1]} is intact" if previous else "no earlier checkpoint exists"
            raise DiskFullError(
                f"the disk is full: writing checkpoint global_step_{step} under {root} failed ({kept}; "
                "the partial one was removed): free space there or lower trainer.max_ckpt_to_keep, "
                "then run again to resume"
            ) from exc
        raise
    if max_to_keep and max_to_keep > 0:
        for _, old in list_checkpoints(output_dir)[:-max_to_keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


# Messages of writers that do not raise an OSError on a full disk (safetensors, torch.save).
_DISK_FULL_TEXT = ("No space left on device", "StorageFull", "Disk quota exceeded")


def _disk_full(exc: BaseException, folder: str) -> bool:
    """Whether a failed write failed for lack of space: ENOSPC / EDQUOT anywhere in the chain
    (also inside a Ray worker's error), or almost no space left on ``folder``'s disk."""
    seen = set()
    err: Optional[BaseException] = exc
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(t in str(err) for t in _DISK_FULL_TEXT):
            return True
        cause = getattr(err, "cause", None)  # the exception a Ray worker raised
        err = cause if isinstance(cause, BaseException) else (err.__cause__ or err.__context__)
    try:
        return shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES
    except OSError:
        return False


def load_trainer_state(path: str) -> dict[str, Any]:
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        return json.load(f)
