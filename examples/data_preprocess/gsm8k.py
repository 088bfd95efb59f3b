"""GSM8K (``openai/gsm8k``) to rlflow's parquet row schema, which is verl's.

Reads a local copy of the raw dataset; nothing is downloaded. For each split (``train``,
``test``) the files are looked up in ``--local_dataset_path DIR`` and then in ``DIR/main``
(the hub repo's config folder); the first folder holding the split wins:

* ``{split}-*.parquet`` shards, as in the hub repo (``main/train-00000-of-00001.parquet``);
* ``{split}.parquet``;
* ``{split}.jsonl`` (or ``.jsonl.gz``), as in the original grade-school-math release.

Every raw row has ``question`` and ``answer``; the answer ends with ``#### <number>``. Each
raw row becomes, in source order::

    {
        "data_source": "openai/gsm8k",
        "prompt": [{"role": "user", "content": question + " " + INSTRUCTION}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "1234"},   # "#### 1,234" -> "1234"
        "extra_info": {"split": "train", "index": 0, "question": question, "answer": answer},
    }

``index`` is the row's position in its source split. Both splits are converted before
anything is written, so bad input leaves no partial output.

Command line::

    python examples/data_preprocess/gsm8k.py --local_dataset_path ~/raw/gsm8k \
        --local_dir ~/data/gsm8k
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

DATA_SOURCE = "openai/gsm8k"
SPLITS = ("train", "test")
# Folders searched for a split, relative to --local_dataset_path: the folder itself, then the
# hub repo's config folder.
SEARCH_SUBDIRS = ("", "main")
REQUIRED_COLUMNS = ("question", "answer")
INSTRUCTION = 'Work through the problem step by step, then write the final number after "####".'

# The final answer marker and the token after it. GSM8K writes thousands separators
# ("#### 1,234"); they are dropped so the ground truth parses as a plain number.
_FINAL_ANSWER_RE = re.compile(r"####\s*(\S+)")
_NUMBER_RE = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+)")


def extract_solution(answer: str) -> str:
    """Return the number after the last ``####`` in a GSM8K answer, commas removed.

    ``"... #### 1,234"`` -> ``"1234"``; ``"#### -3"`` -> ``"-3"``. Raises DataError when there
    is no marker or the text after it is not a number.
    """
    if not isinstance(answer, str):
        raise DataError(f"answer must be a string, got {type(answer).__name__}")
    matches = _FINAL_ANSWER_RE.findall(answer)
    if not matches:
        raise DataError(f"answer has no final '#### <number>' line: {_preview(answer)}")
    number = matches[-1].replace(",", "")
    if not _NUMBER_RE.fullmatch(number):
        raise DataError(f"text after '####' is not a number: {_preview(matches[-1])}")
    return number


def convert_rows(rows: Sequence[dict[str, Any]], split: str) -> list[dict[str, Any]]:
    """Turn raw GSM8K rows (``question``, ``answer``) into rlflow rows (see module docstring).

    Raises DataError naming the row and column for a missing or non-string field or an answer
    without a ``#### <number>`` final line.
    """
    out = []
    for index, row in enumerate(rows):
        question = _string_field(row, "question", index, split)
        answer = _string_field(row, "answer", index, split)
        try:
            ground_truth = extract_solution(answer)
        except DataError as exc:
            raise DataError(f"row {index} of split {split!r}, column 'answer': {exc}") from None
        out.append(
            {
                "data_source": DATA_SOURCE,
                "prompt": [{"role": "user", "content": f"{question} {INSTRUCTION}"}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": ground_truth},
                "extra_info": {
                    "split": split,
                    "index": index,
                    "question": question,
                    "answer": answer,
                },
            }
        )
    return out


def _string_field(row: dict[str, Any], column: str, index: int, split: str) -> str:
    value = row.get(column)
    if not isinstance(value, str):
        raise DataError(
            f"row {index} of split {split!r}: column {column!r} must be a string, "
            f"got {type(value).__name__}"
        )
    return value


def _preview(text: str, limit: int = 60) -> str:
    flat = " ".join(str(text).split())
    return repr(flat if len(flat) <= limit else flat[:limit] + "...")


# --------------------------------------------------------------------------- raw files


def find_split_files(dataset_dir: str | os.PathLike[str], split: str) -> list[Path]:
    """Files holding ``split`` under ``dataset_dir`` (layouts in the module docstring).

    Returns an empty list when no searched folder holds the split. Raises DataError when
    ``dataset_dir`` is not a folder, or when one folder holds the split in two formats (which
    copy is meant would be a guess).
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
    """Concatenate the rows of ``files`` (shards in name order), checking the columns.

    Raises DataError naming the file when a row lacks ``question`` or ``answer``, or when the
    files hold no rows at all.
    """
    rows = []
    for path in files:
        file_rows = read_rows(path)
        for n, row in enumerate(file_rows):
            missing = [c for c in REQUIRED_COLUMNS if c not in row]
            if missing:
                raise DataError(
                    f"{path}: row {n} has no column {missing[0]!r} (columns: {sorted(row)}); "
                    "expected the raw openai/gsm8k fields 'question' and 'answer'"
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
        help="folder with the raw openai/gsm8k files (hub snapshot or train/test.jsonl)",
    )
    parser.add_argument(
        "--local_dir",
        "--local_save_dir",
        dest="local_dir",
        default="~/data/gsm8k",
        help="output folder for train.parquet and test.parquet",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    """Convert both splits, then write ``train.parquet`` and ``test.parquet``.

    Returns ``{"train": path, "test": path}``. Bad input exits with SystemExit carrying a
    one-line message and writes nothing.
    """
    args = _parse_args(argv)
    converted = {}
    try:
        for split in SPLITS:
            files = find_split_files(args.local_dataset_path, split)
            if not files:
                root = Path(args.local_dataset_path).expanduser()
                raise DataError(
                    f"no {split!r} split in {root} or {root / 'main'}: expected "
                    f"{split}-*.parquet, {split}.parquet or {split}.jsonl"
                )
            raw = load_files(files)
            try:
                converted[split] = convert_rows(raw, split)
            except DataError as exc:
                raise DataError(f"{', '.join(map(str, files))}: {exc}") from None
    except DataError as exc:
        raise SystemExit(f"gsm8k.py: error: {exc}") from None
    out_dir = Path(args.local_dir).expanduser()
    paths = {}
    for split, rows in converted.items():
        path = out_dir / f"{split}.parquet"
        write_parquet(rows, path)
        paths[split] = str(path)
        print(f"{split}: {len(rows)} rows -> {path}")
    return paths


if __name__ == "__main__":
    main()
