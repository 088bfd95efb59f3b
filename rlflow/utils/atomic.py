"""Atomic writes: a reader (or a resumed run) finds the old file or folder, or the complete
new one, never a half-written one.

Everything is written beside its target under a temporary name that starts with a dot and
holds ``.tmp-``, then renamed into place; a rename within one filesystem is atomic on POSIX.
A crash leaves at most a temporary entry behind, which :func:`remove_stale_temporaries`
clears.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

TEMP_MARK = ".tmp-"


@contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path`` to write the file to; on a clean exit it
    replaces ``path``, on an error it is removed and ``path`` is untouched."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}{TEMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically, flushed to disk before the rename."""
    with atomic_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def atomic_folder(target: str, fill: Callable[[str], None], *, replace: bool = False) -> str:
    """Build the folder ``target`` with ``fill(tmp_dir)`` in a temporary folder beside it, then
    rename it into place; returns ``target``.

    An existing ``target`` is replaced when ``replace``; otherwise the rename fails and, if
    another process has just built ``target`` (it exists now), that complete copy is kept and
    this one discarded; any other failure raises. The temporary folder never outlives the call.
    """
    target = os.path.abspath(target)
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}{TEMP_MARK}", dir=parent)
    try:
        fill(tmp)
        if replace and os.path.isdir(target):
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            # rename onto a non-empty folder fails on POSIX: a racing builder won
            if replace or not os.path.isdir(target):
                raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def remove_stale_temporaries(folder: str) -> list[str]:
    """Delete the temporary entries a crashed atomic write left in ``folder``; returns them."""
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in os.listdir(folder):
        if name.startswith(".") and TEMP_MARK in name:
            path = os.path.join(folder, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)
            removed.append(path)
    return removed
