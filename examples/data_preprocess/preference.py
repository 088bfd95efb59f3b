"""Preference pairs (prompt / chosen / rejected) to rlflow's preference parquet schema.

Reads a local copy of the raw dataset; nothing is downloaded. The source splits named by
``--train_split`` and ``--test_split`` (default ``train`` / ``test``; UltraFeedback-binarized
uses ``train_prefs`` / ``test_prefs``) are looked up in ``--local_dataset_path DIR`` and then
in ``DIR/data``; the first folder holding a split wins:

* ``{split}-*.parquet`` shards (``data/train_prefs-00000-of-00001.parquet``);
* ``{split}.parquet``;
* ``{split}.jsonl`` or ``{split}.jsonl.gz`` (HH-RLHF ships ``train.jsonl.gz``).

A split that is not there is left out; finding neither is an error.

Accepted row shapes (``chosen`` and ``rejected`` always, ``prompt`` when the pair does not
carry it):

* plain strings: ``prompt`` is the user turn, ``chosen`` / ``rejected`` the two answers;
* full conversations (UltraFeedback-binarized, chat-formatted HH-RLHF): ``chosen`` and
  ``rejected`` are message lists ``[{"role", "content"}, ...]`` ending in the assistant
  answer; the messages before it (which must be the same in both) are the prompt, and the
  ``prompt`` column, if any, is not used;
* answer-only conversations: ``chosen`` / ``rejected`` hold just the assistant message and
  ``prompt`` is a string or a message list.

Each row becomes, in source order::

    {
        "prompt": [{"role": "user", "content": "..."}, ...],   # chat messages
        "chosen": "the preferred assistant answer",
        "rejected": "the other assistant answer",
        "data_source": "preference",                            # --data_source
        "extra_info": {"split": "train", "index": 0},
    }

``split`` is the output split (``train`` / ``test``) and ``index`` the row's position in its
source split. Messages keep only ``role`` and ``content``. All splits are converted before
anything is written, so bad input leaves no partial output.

Command line::

    python examples/data_preprocess/preference.py --local_dataset_path ~/raw/ultrafeedback \
        --local_dir ~/data/ultrafeedback --train_split train_prefs --test_split test_prefs \
        --data_source HuggingFaceH4/ultrafeedback_binarized
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlflow.errors import DataError

DEFAULT_DATA_SOURCE = "preference"
SEARCH_SUBDIRS = ("", "data")
REQUIRED_COLUMNS = ("chosen", "rejected")

Message = dict[str, str]


def normalize_messages(value: Any, what: str) -> list[Message]:
    """Check that ``value`` is a list of ``{"role": str, "content": str}`` and copy it.

    Extra keys are dropped so every output row has the same message struct. ``what`` names
    the field in the error message.
    """
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{what} must be a string or a list of chat messages, got {type(value).__name__}")
    messages = []
    for i, message in enumerate(value):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise DataError(f"{what}[{i}] must be a dict with string 'role' and 'content', got {message!r:.80}")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def split_response(value: Any, column: str) -> tuple[list[Message], str]:
    """Split a ``chosen``/``rejected`` value into (conversation before the answer, answer).

    A string is the answer itself (empty history). A message list must end with an
    ``assistant`` message, whose content is the answer.
    """
    if isinstance(value, str):
        return [], value
    messages = normalize_messages(value, column)
    if not messages:
        raise DataError(f"{column} is an empty conversation; it must end with the assistant answer")
    if messages[-1]["role"] != "assistant":
        raise DataError(
            f"{column} must end with an 'assistant' message (the answer), "
            f"but its last message has role {messages[-1]['role']!r}"
        )
    return messages[:-1], messages[-1]["content"]


def prompt_messages(prompt: Any) -> list[Message]:
    """A ``prompt`` column value as chat messages: a string becomes one user message."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return normalize_messages(prompt, "prompt")


def convert_row(
    row: dict[str, Any], split: str, index: int, data_source: str = DEFAULT_DATA_SOURCE
) -> dict[str, Any]:
    """Convert one raw pair (shapes in the module docstring) into an rlflow preference row."""
    chosen_history, chosen = split_response(row.get("chosen"), "chosen")
    rejected_history, rejected = split_response(row.get("rejected"), "rejected")
    if chosen_history != rejected_history:
        # A pair only compares two answers if both answer the same conversation.
        raise DataError("chosen and rejected conversations differ before the final answer")
    if chosen_history:
        prompt = chosen_history
    elif row.get("prompt") is not None:
        prompt = prompt_messages(row["prompt"])
    else:
        raise DataError("no prompt: there is no 'prompt' column and chosen holds only the answer")
    if not prompt:
        raise DataError("prompt is an empty list of messages")
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "data_source": data_source,
        "extra_info": {"split": split, "index": index},
    }


def convert_rows(
    rows: Sequence[dict[str, Any]], split: str, data_source: str = DEFAULT_DATA_SOURCE
) -> list[dict[str, Any]]:
    """Convert every raw pair; raises DataError naming the row on a malformed one."""
    out = []
    for index, row in enumerate(rows):
        try:
            out.append(convert_row(row, split, index, data_source))
        except DataError as exc:
            raise DataError(f"row {index} of split {split!r}: {exc}") from None
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
    """Concatenate the rows of ``files``; raises DataError naming the file on a missing column."""
    rows = []
    for path in files:
        file_rows = read_rows(path)
        for n, row in enumerate(file_rows):
            missing = [c for c in REQUIRED_COLUMNS if c not in row]
            if missing:
                raise DataError(
                    f"{path}: row {n} has no column {missing[0]!r} (columns: {sorted(row)}); "
                    "a preference dataset needs 'chosen' and 'rejected' (and 'prompt' unless "
                    "they are full conversations)"
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
        "--local_dataset_path", required=True, help="folder with the raw preference dataset files"
    )
    parser.add_argument(
        "--local_dir",
        "--local_save_dir",
        dest="local_dir",
        default="~/data/preference",
        help="output folder for train.parquet and/or test.parquet",
    )
    parser.add_argument("--train_split", default="train", help="source split written as train.parquet")
    parser.add_argument("--test_split", default="test", help="source split written as test.parquet")
    parser.add_argument("--data_source", default=DEFAULT_DATA_SOURCE, help="data_source written on every row")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    """Convert the train and test source splits found, then write ``{split}.parquet`` for each.

    Returns ``{split: path}`` for the splits written. Bad input exits with SystemExit carrying
    a one-line message and writes nothing.
    """
    args = _parse_args(argv)
    converted: dict[str, list[dict[str, Any]]] = {}
    try:
        for split, source_split in (("train", args.train_split), ("test", args.test_split)):
            files = find_split_files(args.local_dataset_path, source_split)
            if not files:
                continue
            raw = load_files(files)
            try:
                converted[split] = convert_rows(raw, split, args.data_source)
            except DataError as exc:
                raise DataError(f"{', '.join(map(str, files))}: {exc}") from None
        if not converted:
            root = Path(args.local_dataset_path).expanduser()
            raise DataError(
                f"neither split {args.train_split!r} (--train_split) nor {args.test_split!r} "
                f"(--test_split) is in {root} or {root / 'data'}: expected {{split}}-*.parquet, "
                "{split}.parquet or {split}.jsonl[.gz]"
            )
    except DataError as exc:
        raise SystemExit(f"preference.py: error: {exc}") from None
    out_dir = Path(args.local_dir).expanduser()
    paths = {}
    for split, rows in converted.items():
        path = out_dir / f"{split}.parquet"
        write_parquet(rows, path)
        paths[split] = str(path)
        print(f"{split}: {len(rows)} pairs -> {path}")
    return paths


if __name__ == "__main__":
    main()
