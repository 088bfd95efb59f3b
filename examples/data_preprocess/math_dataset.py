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
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlflow.errors import DataError
from rlflow.utils.bundled import import_data_preprocess

# Raw-file reading and parquet writing shared with the other scripts (loaded from this folder).
preprocess_io = import_data_preprocess("_preprocess_io")

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


def _check_raw_row(row: dict[str, Any]) -> str | None:
    if "problem" not in row:
        return preprocess_io.missing_column(
            row, ("problem",), "expected MATH fields 'problem' and 'solution' (or 'answer')"
        )
    if "solution" not in row and "answer" not in row:
        return f"has neither a 'solution' nor an 'answer' column (columns: {sorted(row)})"
    return None


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
    converted: dict[str, list[dict[str, Any]]] = {}
    skipped: dict[str, int] = {}
    try:
        for split in SPLITS:
            files = preprocess_io.find_split_files(args.local_dataset_path, split, SEARCH_SUBDIRS)
            if not files:
                continue
            raw, rows = preprocess_io.load_and_convert(
                files, _check_raw_row, lambda loaded: convert_rows(loaded, split, args.data_source)
            )
            if not rows:
                raise DataError(
                    f"{preprocess_io.files_label(files)}: none of the {len(raw)} rows of split "
                    f"{split!r} has an 'answer' or a \\boxed{{...}} answer in 'solution'"
                )
            converted[split] = rows
            skipped[split] = len(raw) - len(rows)
        if not converted:
            root = Path(args.local_dataset_path).expanduser()
            raise DataError(
                f"no 'train' or 'test' split in {root} or {root / 'data'}: expected "
                "{split}-*.parquet, {split}.parquet or {split}.jsonl"
            )
    except DataError as exc:
        raise SystemExit(f"math_dataset.py: error: {exc}") from None
    paths = preprocess_io.write_splits(converted, Path(args.local_dir).expanduser())
    for split, path in paths.items():
        print(
            f"{split}: {len(converted[split])} rows -> {path} "
            f"(skipped {skipped[split]} without a recoverable answer)"
        )
    return paths


if __name__ == "__main__":
    main()
