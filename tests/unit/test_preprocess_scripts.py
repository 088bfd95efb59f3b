r"""Dataset preprocessing scripts (gsm8k, math_dataset, preference) on small raw fixtures.

The committed fixtures under tests/fixtures/raw are JSON-lines files in each source's own
format; hub-style parquet layouts (``main/train-00000-of-00001.parquet``,
``data/train_prefs-00000-of-00001.parquet``) are built here from Python rows.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlflow.errors import DataError
from rlflow.rewards import gsm8k as gsm8k_scorer
from rlflow.rewards import math as math_scorer
from rlflow.utils.bundled import bundled_dir, import_data_preprocess

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "raw"
VERL_COLUMNS = {"data_source", "prompt", "ability", "reward_model", "extra_info"}

gsm8k = import_data_preprocess("gsm8k")
math_dataset = import_data_preprocess("math_dataset")
preference = import_data_preprocess("preference")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_parquet_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def read_output(path: str | Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def run_error(module, argv: list[str]) -> str:
    """Run ``module.main(argv)``, expect a SystemExit with a one-line message, return it."""
    with pytest.raises(SystemExit) as info:
        module.main(argv)
    message = str(info.value.code)
    assert info.value.code not in (0, None)
    assert "\n" not in message
    return message


# =========================================================================== gsm8k


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("3*24=<<3*24=72>>72 pencils.\n#### 72", "72"),
        ("1,000+234=<<1000+234=1234>>1,234\n#### 1,234", "1234"),
        ("5-8=<<5-8=-3>>-3\n#### -3", "-3"),
        ("#### 1,000,000", "1000000"),
        ("5/2=2.5\n#### 2.5", "2.5"),
        ("no space after the marker\n####42", "42"),
        # Only the last marker counts.
        ("draft #### 1\nfinal\n#### 2", "2"),
    ],
)
def test_gsm8k_extract_solution(answer, expected):
    assert gsm8k.extract_solution(answer) == expected


@pytest.mark.parametrize("answer", ["The answer is 72.", "#### seventy", "#### "])
def test_gsm8k_extract_solution_rejects_answers_without_a_number(answer):
    with pytest.raises(DataError, match="####"):
        gsm8k.extract_solution(answer)


def expected_gsm8k_rows(raw: list[dict], split: str) -> list[dict]:
    """The verl row schema written out directly from the raw fields."""
    out = []
    for index, row in enumerate(raw):
        final = row["answer"].rsplit("#### ", 1)[1].strip().replace(",", "")
        out.append(
            {
                "data_source": "openai/gsm8k",
                "prompt": [{"role": "user", "content": row["question"] + " " + gsm8k.INSTRUCTION}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": final},
                "extra_info": {
                    "split": split,
                    "index": index,
                    "question": row["question"],
                    "answer": row["answer"],
                },
            }
        )
    return out


def test_gsm8k_end_to_end_from_jsonl(tmp_path, capsys):
    out = tmp_path / "out"
    paths = gsm8k.main(["--local_dataset_path", str(FIXTURES / "gsm8k"), "--local_dir", str(out)])
    assert paths == {"train": str(out / "train.parquet"), "test": str(out / "test.parquet")}
    for split in ("train", "test"):
        table = pq.read_table(out / f"{split}.parquet")
        assert set(table.column_names) == VERL_COLUMNS
        rows = table.to_pylist()
        assert rows == expected_gsm8k_rows(read_jsonl(FIXTURES / "gsm8k" / f"{split}.jsonl"), split)
    train = read_output(out / "train.parquet")
    assert [r["reward_model"]["ground_truth"] for r in train] == ["72", "1234", "-3", "1000000"]
    assert 'after "####"' in train[0]["prompt"][0]["content"]
    assert "train: 4 rows" in capsys.readouterr().out
    # Nothing but the two outputs (no leftover temporary files).
    assert sorted(p.name for p in out.iterdir()) == ["test.parquet", "train.parquet"]


def test_gsm8k_hub_parquet_layout_gives_the_same_rows(tmp_path):
    raw = tmp_path / "openai_gsm8k"
    for split in ("train", "test"):
        write_parquet_rows(
            raw / "main" / f"{split}-00000-of-00001.parquet",
            read_jsonl(FIXTURES / "gsm8k" / f"{split}.jsonl"),
        )
    gsm8k.main(["--local_dataset_path", str(raw), "--local_save_dir", str(tmp_path / "a")])
    gsm8k.main(["--local_dataset_path", str(FIXTURES / "gsm8k"), "--local_dir", str(tmp_path / "b")])
    for split in ("train", "test"):
        assert read_output(tmp_path / "a" / f"{split}.parquet") == read_output(
            tmp_path / "b" / f"{split}.parquet"
        )


def test_gsm8k_sharded_parquet_is_concatenated_in_order(tmp_path):
    raw = read_jsonl(FIXTURES / "gsm8k" / "train.jsonl")
    write_parquet_rows(tmp_path / "train-00000-of-00002.parquet", raw[:3])
    write_parquet_rows(tmp_path / "train-00001-of-00002.parquet", raw[3:])
    write_parquet_rows(tmp_path / "test-00000-of-00001.parquet", raw[:1])
    gsm8k.main(["--local_dataset_path", str(tmp_path), "--local_dir", str(tmp_path / "out")])
    rows = read_output(tmp_path / "out" / "train.parquet")
    assert [r["extra_info"]["index"] for r in rows] == [0, 1, 2, 3]
    assert [r["extra_info"]["question"] for r in rows] == [r["question"] for r in raw]


def test_gsm8k_ground_truth_scores_full_marks_on_the_reference_answer(tmp_path):
    gsm8k.main(["--local_dataset_path", str(FIXTURES / "gsm8k"), "--local_dir", str(tmp_path)])
    rows = read_output(tmp_path / "train.parquet") + read_output(tmp_path / "test.parquet")
    for row in rows:
        truth = row["reward_model"]["ground_truth"]
        assert gsm8k_scorer.compute_score(row["extra_info"]["answer"], truth) == 1.0
        assert gsm8k_scorer.compute_score("#### 999999", truth) == 0.0


def test_outputs_load_in_rlhf_dataset(tmp_path):
    """The written parquet is what rlflow's own prompt dataset reads."""
    from rlflow.data.rlhf_dataset import RLHFDataset
    from rlflow.demo.assets import build_demo_tokenizer

    gsm8k.main(["--local_dataset_path", str(FIXTURES / "gsm8k"), "--local_dir", str(tmp_path / "g")])
    math_dataset.main(["--local_dataset_path", str(FIXTURES / "math500"), "--local_dir", str(tmp_path / "m")])
    tokenizer = build_demo_tokenizer()
    for path, n_rows in ((tmp_path / "g" / "train.parquet", 4), (tmp_path / "m" / "test.parquet", 3)):
        written = read_output(path)
        dataset = RLHFDataset(str(path), tokenizer, max_prompt_length=512)
        assert len(dataset) == n_rows
        for i, row in enumerate(written):
            item = dataset[i]
            assert item["data_source"] == row["data_source"]
            assert item["reward_model"] == row["reward_model"]
            assert item["extra_info"] == row["extra_info"]


def test_gsm8k_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    message = run_error(gsm8k, ["--local_dataset_path", str(missing), "--local_dir", str(tmp_path / "o")])
    assert "--local_dataset_path" in message and str(missing) in message


def test_gsm8k_missing_split_names_it_and_writes_nothing(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(FIXTURES / "gsm8k" / "train.jsonl", raw / "train.jsonl")
    out = tmp_path / "out"
    message = run_error(gsm8k, ["--local_dataset_path", str(raw), "--local_dir", str(out)])
    assert "'test'" in message and "test.jsonl" in message
    assert not out.exists()


def test_gsm8k_missing_column_names_file_and_column(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(FIXTURES / "gsm8k" / "test.jsonl", raw / "test.jsonl")
    (raw / "train.jsonl").write_text(json.dumps({"question": "q?", "solution": "#### 1"}) + "\n")
    out = tmp_path / "out"
    message = run_error(gsm8k, ["--local_dataset_path", str(raw), "--local_dir", str(out)])
    assert str(raw / "train.jsonl") in message and "'answer'" in message
    assert not out.exists()


def test_gsm8k_malformed_answer_names_row_and_column(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(FIXTURES / "gsm8k" / "test.jsonl", raw / "test.jsonl")
    rows = read_jsonl(FIXTURES / "gsm8k" / "train.jsonl")
    rows[2]["answer"] = "I forgot the final line."
    (raw / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    message = run_error(gsm8k, ["--local_dataset_path", str(raw), "--local_dir", str(tmp_path / "o")])
    assert "row 2" in message and "'answer'" in message and "train.jsonl" in message


def test_gsm8k_invalid_json_line_is_reported_with_its_line_number(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{not json\n')
    shutil.copy(FIXTURES / "gsm8k" / "test.jsonl", tmp_path / "test.jsonl")
    message = run_error(gsm8k, ["--local_dataset_path", str(tmp_path), "--local_dir", str(tmp_path / "o")])
    assert f"{tmp_path / 'train.jsonl'}:2" in message and "invalid JSON" in message


def test_gsm8k_two_formats_of_one_split_is_an_error(tmp_path):
    for name in ("train.jsonl", "test.jsonl"):
        shutil.copy(FIXTURES / "gsm8k" / name, tmp_path / name)
    write_parquet_rows(tmp_path / "train.parquet", read_jsonl(FIXTURES / "gsm8k" / "train.jsonl"))
    message = run_error(gsm8k, ["--local_dataset_path", str(tmp_path), "--local_dir", str(tmp_path / "o")])
    assert "several formats" in message and "train.parquet" in message and "train.jsonl" in message


def test_gsm8k_command_line_exit_status(tmp_path):
    script = bundled_dir("data_preprocess") / "gsm8k.py"
    ok = subprocess.run(
        [sys.executable, str(script), "--local_dataset_path", str(FIXTURES / "gsm8k"), "--local_dir", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert len(read_output(tmp_path / "test.parquet")) == 2
    bad = subprocess.run(
        [sys.executable, str(script), "--local_dataset_path", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().startswith("gsm8k.py: error: --local_dataset_path")


# =========================================================================== MATH


@pytest.mark.parametrize(
    ("solution", "expected"),
    [
        ("So the answer is $\\boxed{5}$.", "5"),
        ("Hence $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("$\\boxed{\\frac{\\sqrt{3}}{2}}$", "\\frac{\\sqrt{3}}{2}"),
        # Two boxes: the last one is the answer.
        ("First $\\boxed{3}$ apples, so in total $\\boxed{12}$.", "12"),
        ("Answer: \\fbox{7}", "7"),
        ("$\\boxed{2}$ then finally \\fbox{-4}", "-4"),
        ("the set $\\boxed{\\{1, 2\\}}$", "\\{1, 2\\}"),
        # An unmatched escaped brace inside the box does not end it early or keep it open.
        ("$\\boxed{[0, 1\\}}$", "[0, 1\\}"),
        ("answer $\\boxed 9$.", "9"),
        ("spaced $\\boxed {x + 1}$", "x + 1"),
        # A box inside a box belongs to the outer one.
        ("$\\boxed{a + \\fbox{b}}$", "a + \\fbox{b}"),
        ("$\\boxed{ 42 }$", "42"),
    ],
)
def test_math_extract_solution(solution, expected):
    assert math_dataset.extract_solution(solution) == expected


@pytest.mark.parametrize(
    "solution",
    [
        "The answer is 5.",
        "$\\boxed{}$",
        "$\\boxed{3}$ but the final one is $\\boxed{\\frac{1}{2}$",  # last box never closes
        "\\boxedfoo{3}",
        "",
    ],
)
def test_math_extract_solution_without_a_recoverable_answer(solution):
    assert math_dataset.extract_solution(solution) is None


def test_math_answer_column_wins_over_the_boxed_solution():
    row = {"problem": "p", "solution": "$\\boxed{0.5}$", "answer": "\\frac{1}{2}"}
    assert math_dataset.ground_truth_for(row) == "\\frac{1}{2}"
    assert math_dataset.ground_truth_for({**row, "answer": "  "}) == "0.5"
    assert math_dataset.ground_truth_for({**row, "answer": None}) == "0.5"
    assert math_dataset.ground_truth_for({"problem": "p", "answer": 7}) == "7"


LIGHTEVAL_TRAIN = [
    {
        "problem": "Compute $\\frac{2}{4}$.",
        "level": "Level 1",
        "type": "Prealgebra",
        "solution": "Dividing top and bottom by 2 gives $\\boxed{\\frac{1}{2}}$.",
    },
    {
        "problem": "Tom has 3 bags of 4 marbles. How many marbles does he have?",
        "level": "Level 1",
        "type": "Prealgebra",
        "solution": "Each bag has $\\boxed{4}$ marbles, so he has $3 \\cdot 4 = \\boxed{12}$ marbles.",
    },
    {
        "problem": "Show that the sum of two even numbers is even.",
        "level": "Level 2",
        "type": "Number Theory",
        "solution": "Write them as $2a$ and $2b$; the sum $2(a+b)$ is even.",
    },
    {
        "problem": "What is $-7 + 3$?",
        "level": "Level 1",
        "type": "Algebra",
        "solution": "We get \\fbox{-4}.",
    },
]
LIGHTEVAL_TEST = [
    {
        "problem": "List the positive divisors of 2.",
        "level": "Level 1",
        "type": "Number Theory",
        "solution": "They are $\\boxed{\\{1, 2\\}}$.",
    },
]


def write_lighteval_snapshot(root: Path) -> Path:
    """MATH-lighteval's hub layout: data/{split}-00000-of-00001.parquet."""
    write_parquet_rows(root / "data" / "train-00000-of-00001.parquet", LIGHTEVAL_TRAIN)
    write_parquet_rows(root / "data" / "test-00000-of-00001.parquet", LIGHTEVAL_TEST)
    return root


def test_math_lighteval_end_to_end(tmp_path, capsys):
    raw = write_lighteval_snapshot(tmp_path / "raw")
    out = tmp_path / "out"
    paths = math_dataset.main(["--local_dataset_path", str(raw), "--local_dir", str(out)])
    assert set(paths) == {"train", "test"}

    table = pq.read_table(out / "train.parquet")
    assert set(table.column_names) == VERL_COLUMNS
    rows = table.to_pylist()
    # Row 2 has no boxed answer: skipped, and the others keep their source index.
    kept = [0, 1, 3]
    assert [r["extra_info"]["index"] for r in rows] == kept
    assert [r["reward_model"] for r in rows] == [
        {"style": "rule", "ground_truth": "\\frac{1}{2}"},
        {"style": "rule", "ground_truth": "12"},
        {"style": "rule", "ground_truth": "-4"},
    ]
    for row, source in zip(rows, [LIGHTEVAL_TRAIN[i] for i in kept]):
        assert row["data_source"] == "DigitalLearningGmbH/MATH-lighteval"
        assert row["ability"] == "math"
        assert row["prompt"] == [
            {"role": "user", "content": source["problem"] + " " + math_dataset.INSTRUCTION}
        ]
        assert row["extra_info"]["split"] == "train"
        assert row["extra_info"]["problem"] == source["problem"]
        assert row["extra_info"]["solution"] == source["solution"]
        assert row["extra_info"]["level"] == source["level"]
        assert row["extra_info"]["type"] == source["type"]
    assert "\\boxed{}" in rows[0]["prompt"][0]["content"]

    test_rows = read_output(out / "test.parquet")
    assert [r["reward_model"]["ground_truth"] for r in test_rows] == ["\\{1, 2\\}"]
    printed = capsys.readouterr().out
    assert "train: 3 rows" in printed and "skipped 1 " in printed
    assert "test: 1 rows" in printed and "skipped 0 " in printed


def test_math500_jsonl_only_test_split(tmp_path):
    out = tmp_path / "out"
    paths = math_dataset.main(
        [
            "--local_dataset_path",
            str(FIXTURES / "math500"),
            "--local_dir",
            str(out),
            "--data_source",
            "HuggingFaceH4/MATH-500",
        ]
    )
    assert list(paths) == ["test"]
    assert sorted(p.name for p in out.iterdir()) == ["test.parquet"]
    raw = read_jsonl(FIXTURES / "math500" / "test.jsonl")
    rows = read_output(out / "test.parquet")
    assert len(rows) == len(raw)
    for index, (row, source) in enumerate(zip(rows, raw)):
        assert row["data_source"] == "HuggingFaceH4/MATH-500"
        assert row["reward_model"] == {"style": "rule", "ground_truth": source["answer"]}
        assert row["extra_info"] == {
            "split": "test",
            "index": index,
            "problem": source["problem"],
            "solution": source["solution"],
            "level": source["level"],
            "subject": source["subject"],
            "unique_id": source["unique_id"],
        }


def test_math_ground_truth_agrees_with_the_math_scorer(tmp_path):
    """The reference solution scores 1.0 against the extracted ground truth, a wrong box 0.0."""
    raw = write_lighteval_snapshot(tmp_path / "raw")
    math_dataset.main(["--local_dataset_path", str(raw), "--local_dir", str(tmp_path / "a")])
    math_dataset.main(["--local_dataset_path", str(FIXTURES / "math500"), "--local_dir", str(tmp_path / "b")])
    rows = (
        read_output(tmp_path / "a" / "train.parquet")
        + read_output(tmp_path / "a" / "test.parquet")
        + read_output(tmp_path / "b" / "test.parquet")
    )
    assert len(rows) == 7
    for row in rows:
        truth = row["reward_model"]["ground_truth"]
        assert math_scorer.compute_score(row["extra_info"]["solution"], truth) == 1.0
        assert math_scorer.compute_score("$\\boxed{1234567}$", truth) == 0.0


def test_math_missing_problem_column(tmp_path):
    write_parquet_rows(tmp_path / "test.parquet", [{"question": "q", "solution": "$\\boxed{1}$"}])
    message = run_error(math_dataset, ["--local_dataset_path", str(tmp_path), "--local_dir", str(tmp_path / "o")])
    assert str(tmp_path / "test.parquet") in message and "'problem'" in message


def test_math_missing_solution_and_answer_columns(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"problem": "p", "level": "Level 1"}) + "\n")
    message = run_error(math_dataset, ["--local_dataset_path", str(tmp_path), "--local_dir", str(tmp_path / "o")])
    assert "train.jsonl" in message and "'solution'" in message and "'answer'" in message


def test_math_no_split_found(tmp_path):
    (tmp_path / "validation.jsonl").write_text(json.dumps({"problem": "p", "solution": "s"}) + "\n")
    message = run_error(math_dataset, ["--local_dataset_path", str(tmp_path), "--local_dir", str(tmp_path / "o")])
    assert "'train'" in message and "'test'" in message and str(tmp_path) in message


def test_math_split_without_any_answer_is_an_error_and_writes_nothing(tmp_path):
    raw = write_lighteval_snapshot(tmp_path / "raw")
    write_parquet_rows(raw / "data" / "test-00000-of-00001.parquet", [LIGHTEVAL_TRAIN[2]])
    out = tmp_path / "out"
    message = run_error(math_dataset, ["--local_dataset_path", str(raw), "--local_dir", str(out)])
    assert "test-00000-of-00001.parquet" in message and "'test'" in message
    assert not out.exists()


def test_math_non_string_problem_names_the_row(tmp_path):
    rows = [{"problem": "ok", "solution": "$\\boxed{1}$"}, {"problem": None, "solution": "$\\boxed{2}$"}]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    message = run_error(math_dataset, ["--local_dataset_path", str(tmp_path), "--local_dir", str(tmp_path / "o")])
    assert "row 1" in message and "'problem'" in message


def test_math_unreadable_parquet(tmp_path):
    (tmp_path / "test.parquet").write_bytes(b"not a parquet file")
    message = run_error(math_dataset, ["--local_dataset_path", str(tmp_path), "--local_dir", str(tmp_path / "o")])
    assert str(tmp_path / "test.parquet") in message and "parquet" in message


# =========================================================================== preference


PREFERENCE_COLUMNS = {"prompt", "chosen", "rejected", "data_source", "extra_info"}


def test_preference_plain_strings_end_to_end(tmp_path):
    out = tmp_path / "out"
    paths = preference.main(
        ["--local_dataset_path", str(FIXTURES / "preference_text"), "--local_dir", str(out)]
    )
    assert paths == {"train": str(out / "train.parquet"), "test": str(out / "test.parquet")}
    for split in ("train", "test"):
        table = pq.read_table(out / f"{split}.parquet")
        assert set(table.column_names) == PREFERENCE_COLUMNS
        raw = read_jsonl(FIXTURES / "preference_text" / f"{split}.jsonl")
        assert table.to_pylist() == [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": r["chosen"],
                "rejected": r["rejected"],
                "data_source": "preference",
                "extra_info": {"split": split, "index": i},
            }
            for i, r in enumerate(raw)
        ]


ULTRAFEEDBACK_TRAIN_PREFS = [
    {
        "prompt": "Name a color of the sky.",
        "prompt_id": "a1",
        "chosen": [
            {"role": "user", "content": "Name a color of the sky."},
            {"role": "assistant", "content": "Blue."},
        ],
        "rejected": [
            {"role": "user", "content": "Name a color of the sky."},
            {"role": "assistant", "content": "Plaid."},
        ],
        "messages": [
            {"role": "user", "content": "Name a color of the sky."},
            {"role": "assistant", "content": "Blue."},
        ],
        "score_chosen": 9.0,
        "score_rejected": 2.0,
    },
    {
        "prompt": "And at night?",
        "prompt_id": "a2",
        "chosen": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Name a color of the sky."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "And at night?"},
            {"role": "assistant", "content": "Black."},
        ],
        "rejected": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Name a color of the sky."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "And at night?"},
            {"role": "assistant", "content": "Also blue, always."},
        ],
        "messages": [],
        "score_chosen": 8.0,
        "score_rejected": 3.0,
    },
]


def test_preference_full_conversations_ultrafeedback_layout(tmp_path):
    raw = tmp_path / "ultrafeedback_binarized"
    write_parquet_rows(raw / "data" / "train_prefs-00000-of-00001.parquet", ULTRAFEEDBACK_TRAIN_PREFS)
    write_parquet_rows(raw / "data" / "test_prefs-00000-of-00001.parquet", ULTRAFEEDBACK_TRAIN_PREFS[:1])
    # A split the run does not ask for is ignored.
    write_parquet_rows(raw / "data" / "train_sft-00000-of-00001.parquet", [{"x": 1}])
    out = tmp_path / "out"
    preference.main(
        [
            "--local_dataset_path",
            str(raw),
            "--local_dir",
            str(out),
            "--train_split",
            "train_prefs",
            "--test_split",
            "test_prefs",
            "--data_source",
            "HuggingFaceH4/ultrafeedback_binarized",
        ]
    )
    rows = read_output(out / "train.parquet")
    assert len(rows) == 2
    first, second = rows
    assert first["prompt"] == [{"role": "user", "content": "Name a color of the sky."}]
    assert (first["chosen"], first["rejected"]) == ("Blue.", "Plaid.")
    # The prompt is the whole conversation before the answer, system turn included.
    assert second["prompt"] == ULTRAFEEDBACK_TRAIN_PREFS[1]["chosen"][:-1]
    assert (second["chosen"], second["rejected"]) == ("Black.", "Also blue, always.")
    assert second["data_source"] == "HuggingFaceH4/ultrafeedback_binarized"
    assert second["extra_info"] == {"split": "train", "index": 1}
    test_rows = read_output(out / "test.parquet")
    assert [r["extra_info"] for r in test_rows] == [{"split": "test", "index": 0}]


def test_preference_answer_only_conversations_with_message_prompt(tmp_path):
    out = tmp_path / "out"
    paths = preference.main(
        ["--local_dataset_path", str(FIXTURES / "preference_chat"), "--local_dir", str(out)]
    )
    assert list(paths) == ["train"]
    raw = read_jsonl(FIXTURES / "preference_chat" / "train.jsonl")
    rows = read_output(out / "train.parquet")
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in raw]
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("7", "9"), ("2+2 is 4.", "2+2 is 5.")]


def test_preference_gzipped_jsonl_and_implicit_prompt(tmp_path):
    """HH-RLHF ships train.jsonl.gz; full conversations need no prompt column."""
    rows = [
        {
            "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!", "extra": 1}],
            "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}],
        }
    ]
    with gzip.open(tmp_path / "train.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    preference.main(["--local_dataset_path", str(tmp_path), "--local_dir", str(tmp_path / "out")])
    assert read_output(tmp_path / "out" / "train.parquet") == [
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "chosen": "hello!",
            "rejected": "go away",
            "data_source": "preference",
            "extra_info": {"split": "train", "index": 0},
        }
    ]


def test_preference_split_response():
    assert preference.split_response("just text", "chosen") == ([], "just text")
    history, answer = preference.split_response(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen"
    )
    assert history == [{"role": "user", "content": "q"}] and answer == "a"
    with pytest.raises(DataError, match="rejected must end with an 'assistant' message"):
        preference.split_response([{"role": "user", "content": "q"}], "rejected")
    with pytest.raises(DataError, match=r"chosen\[0\] must be a dict"):
        preference.split_response([{"role": "user"}], "chosen")
    with pytest.raises(DataError, match="chosen is an empty conversation"):
        preference.split_response([], "chosen")


@pytest.mark.parametrize(
    ("row", "fragment"),
    [
        (
            {
                "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
                "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}],
            },
            "differ before the final answer",
        ),
        ({"chosen": "x", "rejected": "y"}, "no prompt"),
        ({"prompt": 5, "chosen": "x", "rejected": "y"}, "prompt must be a string or a list"),
        ({"prompt": [], "chosen": "x", "rejected": "y"}, "prompt is an empty list"),
        ({"prompt": "p", "chosen": None, "rejected": "y"}, "chosen must be a string or a list"),
    ],
)
def test_preference_malformed_rows(row, fragment):
    with pytest.raises(DataError, match=fragment):
        preference.convert_row(row, "train", 0)


def test_preference_malformed_row_via_main_names_file_and_row(tmp_path):
    rows = read_jsonl(FIXTURES / "preference_text" / "train.jsonl")
    rows[1]["chosen"] = [{"role": "user", "content": "not an answer"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    message = run_error(preference, ["--local_dataset_path", str(tmp_path), "--local_dir", str(out)])
    assert "train.jsonl" in message and "row 1" in message and "'assistant'" in message
    assert not out.exists()


def test_preference_missing_column(tmp_path):
    write_parquet_rows(tmp_path / "train.parquet", [{"prompt": "p", "chosen": "x", "loser": "y"}])
    message = run_error(preference, ["--local_dataset_path", str(tmp_path), "--local_dir", str(tmp_path / "o")])
    assert str(tmp_path / "train.parquet") in message and "'rejected'" in message


def test_preference_no_split_names_the_split_options(tmp_path):
    shutil.copy(FIXTURES / "preference_text" / "train.jsonl", tmp_path / "train.jsonl")
    message = run_error(
        preference,
        ["--local_dataset_path", str(tmp_path), "--local_dir", str(tmp_path / "o"), "--train_split", "train_prefs"],
    )
    assert "'train_prefs'" in message and "--train_split" in message


def test_preference_missing_folder(tmp_path):
    message = run_error(preference, ["--local_dataset_path", str(tmp_path / "absent")])
    assert "--local_dataset_path" in message and "absent" in message
