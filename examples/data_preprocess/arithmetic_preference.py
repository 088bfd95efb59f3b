"""Synthetic arithmetic preference pairs for DPO: the correct answer is chosen over a wrong one.

The prompts are those of ``arithmetic.py`` (``"a+b="`` as one user message); each row adds a
``chosen`` answer (the correct result) and a ``rejected`` answer (a different integer drawn
uniformly from the results the task can produce, so it is a plausible mistake)::

    {
        "prompt": [{"role": "user", "content": "3+4="}],
        "chosen": "7",
        "rejected": "5",
        "data_source": "arithmetic",
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "7"},
        "extra_info": {"split": "train", "index": 0, "expression": "3+4"},
    }

This is the preference schema of ``preference.py`` plus the RL columns, so the same file can
also be scored by the arithmetic rule reward.

Command line::

    python examples/data_preprocess/arithmetic_preference.py --local_dir DIR --train_size N \
        --test_size M --seed S --max_operand K [--ops +-*]
"""

from __future__ import annotations

import operator
import os
import random
from collections.abc import Sequence
from typing import Any

try:  # loaded through rlflow (installed wheel or checkout)
    from rlflow.utils.bundled import import_data_preprocess

    arithmetic = import_data_preprocess("arithmetic")
except ImportError:  # run as a script next to arithmetic.py without rlflow installed
    import arithmetic  # type: ignore[no-redef]

DEFAULT_TRAIN_SIZE = arithmetic.DEFAULT_TRAIN_SIZE
DEFAULT_TEST_SIZE = arithmetic.DEFAULT_TEST_SIZE
# Wrong answers use their own random stream, so the prompts equal arithmetic.py's for a seed.
REJECTED_SEED_OFFSET = 7_919
_OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def possible_results(max_operand: int, ops: Sequence[str], min_operand: int = 0) -> list[int]:
    """Every result ``a op b`` can take with operands in ``[min_operand, max_operand]``, sorted."""
    return sorted(
        {
            _OPERATORS[op](a, b)
            for op in ops
            for a in range(min_operand, max_operand + 1)
            for b in range(min_operand, max_operand + 1)
        }
    )


def wrong_answer(correct: int, candidates: Sequence[int], rng: random.Random) -> int:
    """A uniformly drawn candidate other than ``correct`` (``correct + 1`` if there is none)."""
    wrong = [c for c in candidates if c != correct]
    return rng.choice(wrong) if wrong else correct + 1


def make_pairs(
    num_rows: int,
    seed: int,
    *,
    max_operand: int = arithmetic.DEFAULT_MAX_OPERAND,
    ops: Sequence[str] = ("+",),
    min_operand: int = 0,
    split: str = "train",
) -> list[dict[str, Any]]:
    """``num_rows`` preference rows; prompts match ``arithmetic.make_rows`` with the same
    arguments. The result depends only on the arguments."""
    if isinstance(ops, str):
        ops = tuple(ops)
    rows = arithmetic.make_rows(
        num_rows, seed, max_operand=max_operand, ops=ops, min_operand=min_operand, split=split
    )
    candidates = possible_results(max_operand, ops, min_operand)
    rng = random.Random(seed + REJECTED_SEED_OFFSET)
    pairs = []
    for row in rows:
        correct = int(row["reward_model"]["ground_truth"])
        pairs.append(
            {
                "prompt": row["prompt"],
                "chosen": str(correct),
                "rejected": str(wrong_answer(correct, candidates, rng)),
                "data_source": row["data_source"],
                "ability": row["ability"],
                "reward_model": row["reward_model"],
                "extra_info": row["extra_info"],
            }
        )
    return pairs


def write_splits(
    out_dir: str | os.PathLike[str],
    *,
    train_size: int = DEFAULT_TRAIN_SIZE,
    test_size: int = DEFAULT_TEST_SIZE,
    seed: int = 0,
    max_operand: int = arithmetic.DEFAULT_MAX_OPERAND,
    ops: Sequence[str] = ("+",),
    min_operand: int = 0,
) -> dict[str, str]:
    """Write ``train.parquet`` (seed ``seed``) and ``test.parquet`` (a separate seed stream,
    as in ``arithmetic.write_splits``). Returns ``{"train": path, "test": path}``."""
    return arithmetic.write_seeded_splits(
        out_dir,
        make_pairs,
        train_size=train_size,
        test_size=test_size,
        seed=seed,
        max_operand=max_operand,
        ops=ops,
        min_operand=min_operand,
    )


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    return arithmetic.run_cli(argv, __doc__, write_splits)


if __name__ == "__main__":
    main()
