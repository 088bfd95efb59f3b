"""Two-digit addition prompts for the calculator tool task, in ``arithmetic.py``'s row schema.

Each row is an ``arithmetic.py`` row for ``a+b`` with both operands in 10..99::

    {
        "data_source": "arithmetic",
        "prompt": [{"role": "user", "content": "37+58="}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "95"},
        "extra_info": {"split": "train", "index": 0, "expression": "37+58"},
    }

A tiny model cannot add two-digit numbers itself, so the reward (the arithmetic rule: first
integer of the answer equals the sum) is only reachable by calling a calculator tool. That
makes the task a clean test of whether RL teaches a model to use its tool.

The test split holds distinct expressions that never occur in the train split, so a test
score cannot come from memorising training answers. Train rows are drawn with replacement
from the remaining expressions, like ``arithmetic.py``'s rows.

Command line::

    python examples/data_preprocess/calculator.py --local_dir DIR [--train_size N] \
        [--test_size M] [--seed S] [--min_operand A] [--max_operand B]
"""

from __future__ import annotations

import argparse
import os
import random
from collections.abc import Sequence
from typing import Any

try:  # loaded through rlflow (installed wheel or checkout)
    from rlflow.utils.bundled import import_data_preprocess

    arithmetic = import_data_preprocess("arithmetic")
    preprocess_io = import_data_preprocess("_preprocess_io")
except ImportError:  # run as a script next to arithmetic.py without rlflow installed
    import _preprocess_io as preprocess_io  # type: ignore[no-redef]
    import arithmetic  # type: ignore[no-redef]

DEFAULT_MIN_OPERAND = 10
DEFAULT_MAX_OPERAND = 99
DEFAULT_TRAIN_SIZE = arithmetic.DEFAULT_TRAIN_SIZE
DEFAULT_TEST_SIZE = arithmetic.DEFAULT_TEST_SIZE


def make_splits(
    train_size: int,
    test_size: int,
    seed: int,
    *,
    min_operand: int = DEFAULT_MIN_OPERAND,
    max_operand: int = DEFAULT_MAX_OPERAND,
) -> dict[str, list[dict[str, Any]]]:
    """``{"train": rows, "test": rows}`` of ``a+b`` prompts with operands in the given range.

    The test split takes ``test_size`` distinct operand pairs; the train split draws
    ``train_size`` pairs with replacement from the others. The result depends only on the
    arguments.
    """
    for name, size in (("train_size", train_size), ("test_size", test_size)):
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"{name} must be a non-negative int, got {size!r}")
    if not isinstance(min_operand, int) or not isinstance(max_operand, int):
        raise TypeError(f"min_operand/max_operand must be ints, got {min_operand!r}/{max_operand!r}")
    if min_operand < 0 or max_operand < min_operand:
        raise ValueError(
            f"need 0 <= min_operand <= max_operand, got min_operand={min_operand}, "
            f"max_operand={max_operand}"
        )
    pairs = [(a, b) for a in range(min_operand, max_operand + 1) for b in range(min_operand, max_operand + 1)]
    # The test split needs test_size distinct expressions, the train split at least one more.
    if test_size + (train_size > 0) > len(pairs):
        raise ValueError(
            f"test_size={test_size} does not fit: operands {min_operand}..{max_operand} give only "
            f"{len(pairs)} distinct expressions, and the train split needs at least one of its own"
        )
    rng = random.Random(seed)
    rng.shuffle(pairs)
    test_pairs, train_pool = pairs[:test_size], pairs[test_size:]
    train_pairs = [rng.choice(train_pool) for _ in range(train_size)]
    return {
        split: [arithmetic.make_row(a, "+", b, split=split, index=i) for i, (a, b) in enumerate(chosen)]
        for split, chosen in (("train", train_pairs), ("test", test_pairs))
    }


def write_splits(
    out_dir: str | os.PathLike[str],
    *,
    train_size: int = DEFAULT_TRAIN_SIZE,
    test_size: int = DEFAULT_TEST_SIZE,
    seed: int = 0,
    min_operand: int = DEFAULT_MIN_OPERAND,
    max_operand: int = DEFAULT_MAX_OPERAND,
) -> dict[str, str]:
    """Write ``train.parquet`` and ``test.parquet`` made by :func:`make_splits`.

    Returns ``{"train": path, "test": path}`` as strings.
    """
    splits = make_splits(train_size, test_size, seed, min_operand=min_operand, max_operand=max_operand)
    return preprocess_io.write_splits(splits, out_dir)


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--local_dir", required=True, help="folder for train.parquet and test.parquet")
    parser.add_argument("--train_size", type=int, default=DEFAULT_TRAIN_SIZE)
    parser.add_argument("--test_size", type=int, default=DEFAULT_TEST_SIZE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min_operand", type=int, default=DEFAULT_MIN_OPERAND)
    parser.add_argument("--max_operand", type=int, default=DEFAULT_MAX_OPERAND)
    args = parser.parse_args(argv)
    try:
        paths = write_splits(
            args.local_dir,
            train_size=args.train_size,
            test_size=args.test_size,
            seed=args.seed,
            min_operand=args.min_operand,
            max_operand=args.max_operand,
        )
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"calculator.py: {exc}") from None
    for split, path in paths.items():
        print(f"{split}: {path}")
    return paths


if __name__ == "__main__":
    main()
