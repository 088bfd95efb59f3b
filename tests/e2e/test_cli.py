"""The command line: one-line errors with a non-zero exit, within seconds."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import yaml


def run_cli(args, tmp_path, timeout=120):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RLFLOW_CACHE=str(tmp_path / "cache"))
    env.pop("RLFLOW_DEBUG", None)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "rlflow.main", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout,
    )
    return proc, time.monotonic() - start


def error_lines(proc):
    return [ln for ln in proc.stderr.splitlines() if ln.strip()]


def test_unknown_recipe_is_one_line_error(tmp_path):
    proc, _ = run_cli(["+recipe=does_not_exist"], tmp_path)
    assert proc.returncode == 2
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert "does_not_exist" in lines[0] and "grpo" in lines[0]


def test_unknown_config_key_is_one_line_error(tmp_path):
    for override in ("actor.learning_rate=1e-3", "+actor.learning_rate=1e-3"):
        proc, _ = run_cli(["+recipe=grpo", override], tmp_path)
        assert proc.returncode == 2
        lines = error_lines(proc)
        assert len(lines) == 1, proc.stderr
        assert "actor.learning_rate" in lines[0]


def test_wrong_value_type_names_the_key(tmp_path):
    proc, _ = run_cli(["+recipe=grpo", "rollout.n=eight"], tmp_path)
    assert proc.returncode == 2
    lines = error_lines(proc)
    assert len(lines) == 1 and "rollout.n" in lines[0], proc.stderr


def test_missing_train_file_fails_fast(tmp_path):
    missing = tmp_path / "nope" / "train.parquet"
    proc, seconds = run_cli(["+recipe=grpo", f"data.train_files=[{missing}]"], tmp_path)
    assert proc.returncode == 2
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert str(missing) in lines[0]
    assert seconds < 60


def test_cfg_prints_composed_config_from_any_directory(tmp_path):
    proc, _ = run_cli(["+recipe=grpo", "rollout.n=3", "--cfg"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["rollout"]["n"] == 3
    assert printed["algorithm"]["adv_estimator"] == "grpo"


@pytest.mark.parametrize("recipe_arg", ["recipe=grpo", "+recipe=grpo"])
def test_recipe_with_or_without_plus(tmp_path, recipe_arg):
    proc, _ = run_cli([recipe_arg, "--cfg"], tmp_path)
    assert proc.returncode == 0, proc.stderr
