r"""MATH-style datasets (MATH-lighteval, MATH-500) to rlflow's parquet row schema, which is verl's.

Reads a local copy of the raw dataset; nothing is downloaded. For each split (``train``,
``test``) the files are looked up in ``--local_dataset_path DIR`` and then in ``DIR/data``
(the hub repos' default-config folder); the first folder holding the split wins:

* ``{split}-*.parquet`` shards (``data/train-00000-of-00001.parquet`` in MATH-lighteval);
* ``{split}.parquet``;
* ``{split}.jsonl`` (or ``.jsonl.gz``), e.g. MATH-500's single ``test.jsonl``.

A split that is not there is left out (MATH-500 has only ``test``); finding neither is an
error. Raw rows have ``problem`` and ``solution`` and optionally ``answer``, ``level``,
``type``, ``subject``, ``unique_id``. The ground truth is ``answer`` when the row has a
non-empty one, otherwise the content of the last ``\boxed{...}`` (or ``\fbox{...}``) in
``solution``. Rows with neither are skipped and counted. Each kept row becomes::

    {
        "data_source": "DigitalLearningGmbH/MATH-lighteval",   # --data_source
        "prompt": [{"role": "user", "content": problem + " " + INSTRUCTION}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "\\frac{1}{2}"},
        "extra_info": {"split": "train", "index": 0, "problem": ..., "solution": ...,
                       "level": ..., "type": ...},   # metadata columns the source has
    }

``index`` is the row's position in its source split, so skipped rows leave gaps. All splits
are converted before anything is written, so bad input leaves no partial output.

Command line::

    python examples/data_preprocess/math_dataset.py --local_dataset_path ~/raw/MATH-lighteval \
        --local_dir ~/data/math
    python examples/data_preprocess/math_dataset.py --local_dataset_path ~/raw/MATH-500 \
        --local_dir ~/data/math500 --data_source HuggingFaceH4/MATH-500
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlflow.errors import DataError

DEFAULT_DATA_SOURCE = "DigitalLearningGmbH/MATH-lighteval"
# Names rlflow's reward registry scores with the MATH scorer.
KNOWN_DATA_SOURCES = ("DigitalLearningGmbH/MATH-lighteval", "HuggingFaceH4/MATH-500", "math")
SPLITS = ("train", "test")
SEARCH_SUBDIRS = ("", "data")
# Carried into extra_info when the source has them (MATH-lighteval: level/type; MATH-500:
# level/subject/unique_id).
METADATA_COLUMNS = ("level", "type", "subject", "unique_id")
INSTRUCTION = "Solve the problem step by step and give the final answer in \\boxed{}."

# A box command not followed by a letter, so "\boxedfoo" or "\fboxsep" are not boxes.
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _box_argument(text: str, start: int) -> tuple[str | None, int]:
    """Parse the argument of a box command whose name ends at ``start``.

    Returns ``(content, end)``: ``content`` is None when the braces never close (then ``end``
    is ``len(text)``), or when there is no argument at all (then ``end == start``).
    """
    i = start
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        depth = 0
        j = i
        while j < len(text):
            ch = text[j]
            if ch == "\\":
                # "\{" and "\}" are literal braces in LaTeX, not group delimiters.
                j += 2
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j], j + 1
            j += 1
        return None, len(text)
    if i > start:
        # "\boxed 5$": without braces the argument is the next token.
        token = re.match(r"[^\s$]+", text[i:])
        if token:
            return token.group(0).rstrip("."), i + token.end()
    return None, start


def extract_solution(solution: str) -> str | None:
    r"""Content of the last top-level ``\boxed{...}`` / ``\fbox{...}`` in ``solution``.

    Braces are matched by depth (``\boxed{\frac{1}{2}}`` -> ``\frac{1}{2}``), escaped braces
    ``\{ \}`` do not count, and a box nested inside another is part of the outer box's
    content. ``\boxed 5`` yields ``"5"``. Returns None (no recoverable answer) when there is
    no box, the last box never closes, or its content is blank.
    """
    if not isinstance(solution, str):
        return None
    last: str | None = None
    pos = 0
    while (match := _BOX_RE.search(solution, pos)) is not None:
        content, end = _box_argument(solution, match.end())
        if end == match.end():
            pos = match.end()  # a bare "\boxed" with no argument: not an answer
            continue
        last = content
        pos = end
    if last is None or not last.strip():
        return None
    return last.strip()


def ground_truth_for(row: dict[str, Any]) -> str | None:
    """The row's ``answer`` when non-empty, else :func:`extract_solution` of ``solution``."""
    answer = row.get("answer")
    if answer is not None and str(answer).strip():
        return str(answer).strip()
    return extract_solution(row.get("solution"))


def convert_rows(
    rows: Sequence[dict[str, Any]], split: str, data_source: str = DEFAULT_DATA_SOURCE
) -> list[dict[str, Any]]:
    """Turn raw MATH rows into rlflow rows (see module docstring).

    Rows without a recoverable answer are dropped, so ``len(rows) - len(result)`` is the number
    skipped. Raises DataError naming the row and column when ``problem`` is not a non-empty
    string or ``solution`` is neither a string nor missing.
    """
    metadata = [c for c in METADATA_COLUMNS if any(c in row for row in rows)]
    out = []
    for index, row in enumerate(rows):
        problem = row.get("problem")
        if not isinstance(problem, str) or not problem.strip():
            raise DataError(
                f"row {index} of split {split!r}: column 'problem' must be a non-empty string, "
                f"got {problem!r:.60}"
            )
        solution = row.get("solution")
        if solution is not None and not isinstance(solution, str):
            raise DataError(
                f"row {index} of split {split!r}: column 'solution' must be a string, "
                f"got {type(solution).__name__}"
            )
        ground_truth = ground_truth_for(row)
        if ground_truth is None:
            continue
        extra_info = {"split": split, "index": index, "problem": problem, "solution": solution}
        extra_info.update({c: row.get(c) for c in metadata})
        out.append(
            {
                "data_source": data_source,
                "prompt": [{"role": "user", "content": f"{problem} {INSTRUCTION}"}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": ground_truth},
                "extra_info": extra_info,
            }
        )
    return out


# --------------------------------------------------------------------------- raw files


def find_split_files(dataset_dir: str | os.PathLike[str], split: str) -> list[Path]:
    """Files holding ``split`` under ``dataset_dir`` (layouts in the module docstring).

    Returns an empty list when no searched folder holds the split. Raises DataError when
    ``dataset_dir`` is not a folder, or when one folder holds the split in two formats.
    """
    root = Path(dataset_dir).expanduser()
    if not root.is_dir():
        raise DataError(
            f"--local_dataset_path {str(root)!r} is not a folder; point it at a local copy of "
            "the raw dataset"
        )
    for sub in SEARCH_SUBDIRS:
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


def read_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read one parquet or JSON-lines (optionally gzipped) file into a list of row dicts."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{path}: not a readable parquet file ({_first_line(exc)})") from None
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
        raise DataError(f"{path}: cannot read ({_first_line(exc)})") from None
    return rows


def load_files(files: Sequence[Path]) -> list[dict[str, Any]]:
    """Concatenate the rows of ``files``, checking each has ``problem`` and a solution column.

    Raises DataError naming the file when a row lacks ``problem`` or has neither ``solution``
    nor ``answer``, or when the files hold no rows at all.
    """
    rows = []
    for path in files:
        file_rows = read_rows(path)
        for n, row in enumerate(file_rows):
            if "problem" not in row:
                raise DataError(
                    f"{path}: row {n} has no column 'problem' (columns: {sorted(row)}); "
                    "expected MATH fields 'problem' and 'solution' (or 'answer')"
                )
            if "solution" not in row and "answer" not in row:
                raise DataError(
                    f"{path}: row {n} has neither a 'solution' nor an 'answer' column "
                    f"(columns: {sorted(row)})"
                )
        rows.extend(file_rows)
    if not rows:
        raise DataError(f"{', '.join(map(str, files))}: no rows")
    return rows


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- output


def write_parquet(rows: list[dict[str, Any]], path: str | os.PathLike[str]) -> None:
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


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--local_dataset_path",
        required=True,
        help="folder with the raw dataset files (hub snapshot, or train/test .parquet/.jsonl)",
    )
    parser.add_argument(
        "--local_dir",
        "--local_save_dir",
        dest="local_dir",
        default="~/data/math",
        help="output folder for train.parquet and/or test.parquet",
    )
    parser.add_argument(
        "--data_source",
        default=DEFAULT_DATA_SOURCE,
        help=f"data_source written on every row (picks the reward scorer); one of "
        f"{', '.join(KNOWN_DATA_SOURCES)} or a name you register a scorer for",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    """Convert every split found, then write ``{split}.parquet`` for each.

    Returns ``{split: path}`` for the splits written. Prints, per split, how many rows were
    kept and how many were skipped for lack of an answer. Bad input exits with SystemExit
    carrying a one-line message and writes nothing.
    """
    args = _parse_args(argv)
    converted: dict[str, tuple[list[dict[str, Any]], int]] = {}
    try:
        for split in SPLITS:
            files = find_split_files(args.local_dataset_path, split)
            if not files:
                continue
            raw = load_files(files)
            try:
                rows = convert_rows(raw, split, args.data_source)
            except DataError as exc:
                raise DataError(f"{', '.join(map(str, files))}: {exc}") from None
            if not rows:
                raise DataError(
                    f"{', '.join(map(str, files))}: none of the {len(raw)} rows of split "
                    f"{split!r} has an 'answer' or a \\boxed{{...}} answer in 'solution'"
                )
            converted[split] = (rows, len(raw) - len(rows))
        if not converted:
            root = Path(args.local_dataset_path).expanduser()
            raise DataError(
                f"no 'train' or 'test' split in {root} or {root / 'data'}: expected "
                "{split}-*.parquet, {split}.parquet or {split}.jsonl"
            )
    except DataError as exc:
        raise SystemExit(f"math_dataset.py: error: {exc}") from None
    out_dir = Path(args.local_dir).expanduser()
    paths = {}
    for split, (rows, skipped) in converted.items():
        path = out_dir / f"{split}.parquet"
        write_parquet(rows, path)
        paths[split] = str(path)
        print(
            f"{split}: {len(rows)} rows -> {path} (skipped {skipped} without a recoverable answer)"
        )
    return paths


if __name__ == "__main__":
    main()
