"""Synthetic arithmetic prompts in rlflow's (verl's) parquet row schema.

Each row is::

    {
        "data_source": "arithmetic",
        "prompt": [{"role": "user", "content": "3+4="}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "7"},
        "extra_info": {"split": "train", "index": 0, "expression": "3+4"},
    }

The default task (a+b with operands 0..4) has single-digit answers, so a tiny model trained
from a random initialisation has a fair chance of sampling the right answer, which is what
RL needs to get a learning signal at all.

Command line::

    python examples/data_preprocess/arithmetic.py --local_dir DIR --train_size N \
        --test_size M --seed S --max_operand K [--ops +-*]
"""

from __future__ import annotations

import argparse
import os
import random
from collections.abc import Callable, Sequence
from typing import Any

try:  # loaded through rlflow (installed wheel or checkout)
    from rlflow.utils.bundled import import_data_preprocess

    preprocess_io = import_data_preprocess("_preprocess_io")
except ImportError:  # run as a script from this folder without rlflow installed
    import _preprocess_io as preprocess_io  # type: ignore[no-redef]

DATA_SOURCE = "arithmetic"
SUPPORTED_OPS = ("+", "-", "*")
DEFAULT_MAX_OPERAND = 4
DEFAULT_TRAIN_SIZE = 2048
DEFAULT_TEST_SIZE = 256
# The test split is drawn from a different stream than the train split; the offset keeps the
# two seeds apart for any user-chosen base seed.
TEST_SEED_OFFSET = 1_000_003


def _apply(op: str, a: int, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    return a * b


def _check_args(num_rows: int, max_operand: int, min_operand: int, ops: Sequence[str]) -> None:
    if not isinstance(num_rows, int) or isinstance(num_rows, bool) or num_rows < 0:
        raise ValueError(f"num_rows must be a non-negative int, got {num_rows!r}")
    if not isinstance(max_operand, int) or not isinstance(min_operand, int):
        raise TypeError(f"min_operand/max_operand must be ints, got {min_operand!r}/{max_operand!r}")
    if min_operand < 0 or max_operand < min_operand:
        raise ValueError(
            f"need 0 <= min_operand <= max_operand, got min_operand={min_operand}, "
            f"max_operand={max_operand}"
        )
    if isinstance(ops, str):
        ops = tuple(ops)
    if not ops or any(op not in SUPPORTED_OPS for op in ops):
        raise ValueError(f"ops must be a non-empty subset of {SUPPORTED_OPS}, got {tuple(ops)!r}")


def make_row(a: int, op: str, b: int, *, split: str, index: int) -> dict[str, Any]:
    """Build one row for the expression ``a op b`` (prompt text ``"a op b="``)."""
    expression = f"{a}{op}{b}"
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": f"{expression}="}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": str(_apply(op, a, b))},
        "extra_info": {"split": split, "index": index, "expression": expression},
    }


def make_rows(
    num_rows: int,
    seed: int,
    *,
    max_operand: int = DEFAULT_MAX_OPERAND,
    ops: Sequence[str] = ("+",),
    min_operand: int = 0,
    split: str = "train",
) -> list[dict[str, Any]]:
    """Draw ``num_rows`` expressions ``a op b`` with operands uniform in [min_operand, max_operand].

    Operators are drawn uniformly from ``ops``. Rows are sampled with replacement (the set of
    distinct expressions is small by design). The result depends only on the arguments.
    """
    if isinstance(ops, str):
        ops = tuple(ops)
    _check_args(num_rows, max_operand, min_operand, ops)
    rng = random.Random(seed)
    rows = []
    for index in range(num_rows):
        a = rng.randint(min_operand, max_operand)
        b = rng.randint(min_operand, max_operand)
        op = ops[rng.randrange(len(ops))]
        rows.append(make_row(a, op, b, split=split, index=index))
    return rows


def write_seeded_splits(
    out_dir: str | os.PathLike[str],
    make: Callable[..., list[dict[str, Any]]],
    *,
    train_size: int,
    test_size: int,
    seed: int,
    **task: Any,
) -> dict[str, str]:
    """Write ``train.parquet`` and ``test.parquet`` made by ``make(size, seed, split=..., **task)``.

    The train split uses ``seed`` and the test split ``seed + TEST_SEED_OFFSET``, so the two
    are independent draws. Both are generated before either is written. Returns
    ``{"train": path, "test": path}`` as strings.
    """
    splits = {
        "train": make(train_size, seed, split="train", **task),
        "test": make(test_size, seed + TEST_SEED_OFFSET, split="test", **task),
    }
    return preprocess_io.write_splits(splits, out_dir)


def write_splits(
    out_dir: str | os.PathLike[str],
    *,
    train_size: int = DEFAULT_TRAIN_SIZE,
    test_size: int = DEFAULT_TEST_SIZE,
    seed: int = 0,
    max_operand: int = DEFAULT_MAX_OPERAND,
    ops: Sequence[str] = ("+",),
    min_operand: int = 0,
) -> dict[str, str]:
    """Write ``train.parquet`` (seed ``seed``) and ``test.parquet`` (seed ``seed + offset``).

    Returns ``{"train": path, "test": path}`` as strings.
    """
    return write_seeded_splits(
        out_dir,
        make_rows,
        train_size=train_size,
        test_size=test_size,
        seed=seed,
        max_operand=max_operand,
        ops=ops,
        min_operand=min_operand,
    )


def run_cli(
    argv: Sequence[str] | None, description: str, write: Callable[..., dict[str, str]]
) -> dict[str, str]:
    """Parse the task options (``--local_dir``, sizes, seed, operands, ops) from ``argv``, call
    ``write(local_dir, train_size=..., ...)`` (a ``write_splits``) and print the paths.

    ``description`` is the script's docstring; its first paragraph is the ``--help`` text.
    """
    parser = argparse.ArgumentParser(description=description.split("\n\n")[0])
    parser.add_argument("--local_dir", required=True, help="folder for train.parquet and test.parquet")
    parser.add_argument("--train_size", type=int, default=DEFAULT_TRAIN_SIZE)
    parser.add_argument("--test_size", type=int, default=DEFAULT_TEST_SIZE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_operand", type=int, default=DEFAULT_MAX_OPERAND)
    parser.add_argument("--min_operand", type=int, default=0)
    parser.add_argument(
        "--ops",
        default="+",
        help="operators to draw from, e.g. '+-*' (write --ops=-+ when the value starts with '-')",
    )
    args = parser.parse_args(argv)
    paths = write(
        args.local_dir,
        train_size=args.train_size,
        test_size=args.test_size,
        seed=args.seed,
        max_operand=args.max_operand,
        ops=tuple(args.ops),
        min_operand=args.min_operand,
    )
    for split, path in paths.items():
        print(f"{split}: {path}")
    return paths


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    return run_cli(argv, __doc__, write_splits)


if __name__ == "__main__":
    main()
