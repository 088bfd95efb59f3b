"""ledger.jsonl: the dataset rows each step trained on, cut back on resume."""

from __future__ import annotations

import json

from rlflow.trainer.tracking import MetricsLog, PromptLedger


def test_ledger_appends_one_line_per_step_and_truncates_for_a_resume(tmp_path):
    ledger = PromptLedger(str(tmp_path))
    for step, indices in enumerate(([3, 1], [0, 2], [5, 4]), start=1):
        ledger.log(step, indices)
    ledger.truncate_after(1)
    ledger.log(2, [2, 0])
    lines = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "indices": [3, 1]}, {"step": 2, "indices": [2, 0]}]


def test_truncating_a_missing_ledger_or_metrics_file_is_a_no_op(tmp_path):
    PromptLedger(str(tmp_path)).truncate_after(0)
    metrics = MetricsLog(str(tmp_path))
    metrics.truncate_after(0)
    assert not (tmp_path / "ledger.jsonl").exists() and not (tmp_path / "metrics.jsonl").exists()
    metrics.log({"step": 1, "reward/mean": 0.5})
    metrics.log({"step": 2, "reward/mean": 0.7})
    metrics.truncate_after(1)
    assert metrics.history == [{"step": 1, "reward/mean": 0.5}]
