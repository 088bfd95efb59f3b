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
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlflow.errors import DataError
from rlflow.utils.bundled import import_data_preprocess

# Raw-file reading and parquet writing shared with the other scripts (loaded from this folder).
preprocess_io = import_data_preprocess("_preprocess_io")

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


def _check_raw_row(row: dict[str, Any]) -> str | None:
    return preprocess_io.missing_column(
        row, REQUIRED_COLUMNS, "expected the raw openai/gsm8k fields 'question' and 'answer'"
    )


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
            files = preprocess_io.find_split_files(args.local_dataset_path, split, SEARCH_SUBDIRS)
            if not files:
                root = Path(args.local_dataset_path).expanduser()
                raise DataError(
                    f"no {split!r} split in {root} or {root / 'main'}: expected "
                    f"{split}-*.parquet, {split}.parquet or {split}.jsonl"
                )
            _, converted[split] = preprocess_io.load_and_convert(
                files, _check_raw_row, lambda loaded: convert_rows(loaded, split)
            )
    except DataError as exc:
        raise SystemExit(f"gsm8k.py: error: {exc}") from None
    paths = preprocess_io.write_splits(converted, Path(args.local_dir).expanduser())
    for split, path in paths.items():
        print(f"{split}: {len(converted[split])} rows -> {path}")
    return paths


if __name__ == "__main__":
    main()
