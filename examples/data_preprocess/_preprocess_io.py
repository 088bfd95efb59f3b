"""File handling shared by the preprocessing scripts: find and read raw splits, write parquet.

Raw split layout (what :func:`find_split_files` looks for in each searched folder, first folder
holding the split wins):

* ``{split}-*.parquet`` shards, as in hub repos (``data/train-00000-of-00001.parquet``);
* ``{split}.parquet``;
* ``{split}.jsonl`` or ``{split}.jsonl.gz``.

The scripts load this module through :func:`rlflow.utils.bundled.import_data_preprocess` (so it
is found next to them in a checkout and in an installed wheel) or, without rlflow, as a plain
import from the script's own folder.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

try:
    from rlflow.errors import DataError
except ImportError:  # arithmetic*.py run without rlflow: they only write, and raise no DataError
    DataError = ValueError  # type: ignore[assignment,misc]

Row = dict[str, Any]


def files_label(files: Sequence[Path]) -> str:
    """The files of one split as one comma-separated string, for error messages."""
    return ", ".join(map(str, files))


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- raw files


def find_split_files(
    dataset_dir: str | os.PathLike[str], split: str, subdirs: Sequence[str] = ("",)
) -> list[Path]:
    """Files holding ``split`` in ``dataset_dir`` or its ``subdirs`` (``""`` is the folder itself).

    Folders are searched in ``subdirs`` order. Returns an empty list when none holds the
    split. Raises DataError when ``dataset_dir`` is not a folder, or when one folder holds the
    split in two formats (which copy is meant would be a guess).
    """
    root = Path(dataset_dir).expanduser()
    if not root.is_dir():
        raise DataError(
            f"--local_dataset_path {str(root)!r} is not a folder; point it at a local copy of "
            "the raw dataset"
        )
    for sub in subdirs:
        folder = root / sub if sub else root
        if not folder.is_dir():
            continue
        groups = [
            found
            for pattern in (f"{split}-*.parquet", f"{split}.parquet", f"{split}.jsonl", f"{split}.jsonl.gz")
            if (found := sorted(folder.glob(pattern)))
        ]
        if len(groups) > 1:
            names = ", ".join(group[0].name for group in groups)
            raise DataError(f"{folder}: split {split!r} is there in several formats ({names}); keep one")
        if groups:
            return groups[0]
    return []


def read_rows(path: str | os.PathLike[str]) -> list[Row]:
    """Read one parquet or JSON-lines (optionally gzipped) file into a list of row dicts."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{path}: not a readable parquet file ({first_line(exc)})") from None
    opener = gzip.open if path.name.endswith(".gz") else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{lineno}: expected one JSON object per line")
                rows.append(row)
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({first_line(exc)})") from None
    return rows


def missing_column(row: Row, columns: Sequence[str], hint: str) -> str | None:
    """A ``check_row`` body for :func:`load_files`: complain about the first of ``columns``
    that ``row`` lacks, followed by ``hint`` (what the script expects)."""
    missing = [c for c in columns if c not in row]
    if missing:
        return f"has no column {missing[0]!r} (columns: {sorted(row)}); {hint}"
    return None


def load_files(files: Sequence[Path], check_row: Callable[[Row], str | None]) -> list[Row]:
    """Concatenate the rows of ``files`` (shards in the given order), checking each row.

    ``check_row(row)`` returns None for a usable row, else what is wrong with it (e.g.
    ``"has no column 'answer' ..."``), which is raised as DataError ``"<file>: row <n> <what>"``.
    Also raises DataError when the files hold no rows at all.
    """
    rows = []
    for path in files:
        file_rows = read_rows(path)
        for n, row in enumerate(file_rows):
            problem = check_row(row)
            if problem is not None:
                raise DataError(f"{path}: row {n} {problem}")
        rows.extend(file_rows)
    if not rows:
        raise DataError(f"{files_label(files)}: no rows")
    return rows


def load_and_convert(
    files: Sequence[Path],
    check_row: Callable[[Row], str | None],
    convert: Callable[[list[Row]], list[Row]],
) -> tuple[list[Row], list[Row]]:
    """``(raw, convert(raw))`` with ``raw = load_files(files, check_row)``.

    A DataError from ``convert`` (which names the row) is raised again prefixed with the
    file names, so the message says where the bad row is.
    """
    raw = load_files(files, check_row)
    try:
        return raw, convert(raw)
    except DataError as exc:
        raise DataError(f"{files_label(files)}: {exc}") from None


# --------------------------------------------------------------------------- output


def write_parquet(rows: list[Row], path: str | os.PathLike[str]) -> None:
    """Write ``rows`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_splits(splits: Mapping[str, list[Row]], out_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Write each split's rows to ``<out_dir>/<split>.parquet``, in order.

    Returns ``{split: path}`` with the paths as strings.
    """
    out = Path(out_dir)
    paths = {}
    for split, rows in splits.items():
        path = out / f"{split}.parquet"
        write_parquet(rows, path)
        paths[split] = str(path)
    return paths
