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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlflow.errors import DataError
from rlflow.utils.bundled import import_data_preprocess

# Raw-file reading and parquet writing shared with the other scripts (loaded from this folder).
preprocess_io = import_data_preprocess("_preprocess_io")

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


def _check_raw_row(row: dict[str, Any]) -> str | None:
    return preprocess_io.missing_column(
        row,
        REQUIRED_COLUMNS,
        "a preference dataset needs 'chosen' and 'rejected' (and 'prompt' unless they are "
        "full conversations)",
    )


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
            files = preprocess_io.find_split_files(args.local_dataset_path, source_split, SEARCH_SUBDIRS)
            if not files:
                continue
            _, converted[split] = preprocess_io.load_and_convert(
                files, _check_raw_row, lambda loaded: convert_rows(loaded, split, args.data_source)
            )
        if not converted:
            root = Path(args.local_dataset_path).expanduser()
            raise DataError(
                f"neither split {args.train_split!r} (--train_split) nor {args.test_split!r} "
                f"(--test_split) is in {root} or {root / 'data'}: expected {{split}}-*.parquet, "
                "{split}.parquet or {split}.jsonl[.gz]"
            )
    except DataError as exc:
        raise SystemExit(f"preference.py: error: {exc}") from None
    paths = preprocess_io.write_splits(converted, Path(args.local_dir).expanduser())
    for split, path in paths.items():
        print(f"{split}: {len(converted[split])} pairs -> {path}")
    return paths


if __name__ == "__main__":
    main()
