"""Fixtures of the real-model tier (`make test-real`): SmolLM2-135M-Instruct, GSM8K, MATH and
real preference pairs, fetched by tools/real_parts.py (`make real-parts`) into the rlflow cache.

A part that cannot be fetched fails the tests that need it with the fetch's one-line error;
nothing here is skipped. test_real_vllm.py needs vLLM and runs in .venv-vllm (`make
test-real` runs it there); elsewhere it is left out of collection, unless RLFLOW_REQUIRE_VLLM=1
makes a missing vLLM an error.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from rlflow.workers.rollout import vllm_installed
from tools.real_parts import RealPartError, ensure

if vllm_installed():
    # .venv-vllm runs the vLLM tests only; the rest of the tier runs in .venv
    collect_ignore_glob = [p.name for p in Path(__file__).parent.glob("test_*.py") if p.name != "test_real_vllm.py"]
elif os.environ.get("RLFLOW_REQUIRE_VLLM") == "1":
    raise RuntimeError("RLFLOW_REQUIRE_VLLM=1 but vllm is not importable: run `make test-real`")
else:
    collect_ignore_glob = ["test_real_vllm.py"]

MODEL = "smollm2-135m-instruct"


def real_part(name: str) -> Path:
    try:
        return ensure(name)
    except RealPartError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def real_model() -> str:
    return str(real_part(MODEL))


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    return real_part("gsm8k")


@pytest.fixture(scope="session")
def math_dir() -> Path:
    return real_part("math")


@pytest.fixture(scope="session")
def preference_dir() -> Path:
    return real_part("preference")


@pytest.fixture(scope="session")
def shortest_rows(tmp_path_factory):
    """``(parquet, column, count) -> path``: the ``count`` real rows with the shortest
    ``extra_info[column]`` (short prompts keep the 135M model's steps cheap), unchanged, in a
    new parquet file."""

    def write(parquet: Path, column: str, count: int) -> str:
        frame = pd.read_parquet(parquet)
        lengths = frame["extra_info"].map(lambda info: len(info[column]))
        out = tmp_path_factory.mktemp("rows") / parquet.name
        frame.loc[lengths.sort_values(kind="stable").index[:count]].to_parquet(out)
        return str(out)

    return write
