"""The code scorer runs a response's code against the row's tests in the sandbox."""

from __future__ import annotations

import time

import pytest

from rlflow.agents.sandbox import SandboxLimits
from rlflow.rewards import code, default_compute_score
from rlflow.rewards.contract import check_result

SMALL = SandboxLimits(cpu_time_s=2, wall_time_s=2)
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"


def respond(body: str) -> str:
    return f"Here is my solution:\n```python\n{body}\n```\nIt adds the numbers."


def test_correct_solution_scores_one():
    result = code.compute_score(respond("def add(a, b):\n    return a + b"), TESTS, limits=SMALL)
    assert result["score"] == 1.0
    assert result["timeout"] == result["error"] == result["blocked"] == 0.0
    check_result(code.compute_score, result)  # a dict of numbers, as the reward worker needs


def test_wrong_solution_scores_zero():
    result = code.compute_score(respond("def add(a, b):\n    return a - b"), TESTS, limits=SMALL)
    assert result["score"] == 0.0 and result["error"] == 1.0


def test_infinite_loop_scores_zero_quickly():
    start = time.monotonic()
    result = code.compute_score(respond("def add(a, b):\n    while True:\n        pass"), TESTS, limits=SMALL)
    assert result["score"] == 0.0 and result["timeout"] == 1.0
    assert time.monotonic() - start < SMALL.wall_time_s + 3


@pytest.mark.parametrize("exit_call", ["import sys\nsys.exit(0)", "exit()", "import os\nos._exit(0)"])
def test_exiting_before_the_tests_scores_zero(exit_call):
    # The process ends cleanly, but the tests never ran.
    result = code.compute_score(respond(f"def add(a, b):\n    return a - b\n{exit_call}"), TESTS, limits=SMALL)
    assert result["score"] == 0.0 and result["error"] == 1.0


def test_forbidden_operation_scores_zero_and_is_flagged():
    body = "import os\nos.system('echo hi')\ndef add(a, b):\n    return a + b"
    result = code.compute_score(respond(body), TESTS, limits=SMALL)
    assert result["score"] == 0.0 and result["blocked"] == 1.0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("```python\nx = 1\n```", "x = 1\n"),
        ("```py\nx = 1\n```", "x = 1\n"),
        ("first\n```python\nx = 1\n```\nthen\n```python\nx = 2\n```\ndone", "x = 2\n"),  # the last block
        ("```python\nx = 1\n```\n```text\nnot code\n```", "x = 1\n"),  # a python block beats any other
        ("```\nx = 3\n```", "x = 3\n"),  # untagged, when there is no python block
        ("x = 4", "x = 4"),  # no block at all: the whole text
    ],
)
def test_extract_code(text, expected):
    assert code.extract_code(text) == expected


def test_registered_under_code():
    result = default_compute_score("code", respond("def add(a, b):\n    return a + b"), TESTS)
    assert result["score"] == 1.0


def test_ground_truth_must_be_test_code():
    with pytest.raises(TypeError, match="ground_truth"):
        code.compute_score(respond("x = 1"), None, limits=SMALL)
