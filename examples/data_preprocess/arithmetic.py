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
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    out = Path(out_dir)
    paths = {}
    for split, size, split_seed in (
        ("train", train_size, seed),
        ("test", test_size, seed + TEST_SEED_OFFSET),
    ):
        rows = make_rows(
            size, split_seed, max_operand=max_operand, ops=ops, min_operand=min_operand, split=split
        )
        path = out / f"{split}.parquet"
        write_parquet(rows, path)
        paths[split] = str(path)
    return paths


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    args = _parse_args(argv)
    paths = write_splits(
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


if __name__ == "__main__":
    main()
