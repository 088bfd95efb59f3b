"""The arithmetic preference-pair generator and its demo path."""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest

from rlflow.utils.bundled import import_data_preprocess

pairs = import_data_preprocess("arithmetic_preference")
arithmetic = import_data_preprocess("arithmetic")


def test_chosen_is_the_correct_result_and_rejected_a_wrong_one():
    rows = pairs.make_pairs(300, seed=3, max_operand=4, ops="+-")
    for row in rows:
        expression = row["extra_info"]["expression"]
        a, op, b = int(expression[0]), expression[1], int(expression[2:])
        correct = a + b if op == "+" else a - b
        assert row["chosen"] == str(correct) == row["reward_model"]["ground_truth"]
        assert row["rejected"] != row["chosen"]
        # A plausible mistake: a value the task can produce.
        assert -4 <= int(row["rejected"]) <= 8
        assert row["prompt"] == [{"role": "user", "content": f"{expression}="}]


def test_prompts_match_the_rl_dataset_and_wrong_answers_spread():
    rows = pairs.make_pairs(400, seed=5)
    rl_rows = arithmetic.make_rows(400, seed=5)
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in rl_rows]
    assert pairs.make_pairs(400, seed=5) == rows, "deterministic for a seed"
    rejected = {r["rejected"] for r in rows}
    assert len(rejected) >= 8, "wrong answers should cover the result range, not one value"


def test_possible_results_and_degenerate_case():
    assert pairs.possible_results(2, "+") == [0, 1, 2, 3, 4]
    assert pairs.possible_results(2, "*", min_operand=1) == [1, 2, 4]
    # 0+0 only: there is no other result, so the wrong answer is the next integer.
    rows = pairs.make_pairs(3, seed=0, max_operand=0)
    assert {(r["chosen"], r["rejected"]) for r in rows} == {("0", "1")}


def test_write_splits_and_cli(tmp_path):
    paths = pairs.main(["--local_dir", str(tmp_path), "--train_size", "20", "--test_size", "7", "--seed", "1"])
    train = pq.read_table(paths["train"]).to_pylist()
    test = pq.read_table(paths["test"]).to_pylist()
    assert len(train) == 20 and len(test) == 7
    assert {r["extra_info"]["split"] for r in test} == {"test"}
    assert set(train[0]) == {"prompt", "chosen", "rejected", "data_source", "ability", "reward_model", "extra_info"}


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="ops"):
        pairs.make_pairs(3, seed=0, ops="/")
    with pytest.raises(ValueError, match="num_rows"):
        pairs.make_pairs(-1, seed=0)


def test_demo_path_resolves_to_the_pairs(tmp_path, monkeypatch):
    from rlflow.demo.assets import PREFERENCE_TEST_SIZE, resolve_demo_path

    monkeypatch.setenv("RLFLOW_CACHE", str(tmp_path))
    path = resolve_demo_path("demo:arithmetic_preference/test.parquet")
    assert path.startswith(str(tmp_path))
    rows = pq.read_table(path).to_pylist()
    assert len(rows) == PREFERENCE_TEST_SIZE
    assert all(r["chosen"] == r["reward_model"]["ground_truth"] != r["rejected"] for r in rows)
    assert resolve_demo_path("demo:arithmetic_preference") == os.path.dirname(path)
