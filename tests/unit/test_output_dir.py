"""default_output_dir: ./outputs locally, a durable root under Ray jobs or RLFLOW_OUTPUT_ROOT."""

from __future__ import annotations

import datetime
import logging
import os

import pytest

from rlflow.trainer.output_dir import default_output_dir, is_ray_job_driver, is_ray_temporary_dir

NOW = 1_790_000_000.0  # a fixed instant, so the timestamp folder is known
STAMP = datetime.datetime.fromtimestamp(NOW).strftime("%Y%m%d-%H%M%S")
JOB_CWD = "/tmp/ray/session_2026-11-23_11-45-06_431188_2036/runtime_resources/working_dir_files/_ray_pkg_00af"


def test_local_run_writes_under_outputs_in_the_working_directory():
    path = default_output_dir("grpo-demo", environ={"HOME": "/home/u"}, cwd="/work/proj", now=NOW)
    assert path == f"/work/proj/outputs/grpo-demo/{STAMP}"


def test_process_defaults_are_cwd_and_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key in ("RLFLOW_OUTPUT_ROOT", "RAY_JOB_CONFIG_JSON_ENV_VAR", "RAY_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    path = default_output_dir("exp")
    assert os.path.dirname(path) == os.path.join(str(tmp_path), "outputs", "exp")
    assert len(os.path.basename(path)) == len("YYYYmmdd-HHMMSS")


def test_driver_in_ray_job_working_dir_writes_under_home():
    path = default_output_dir("grpo-demo", environ={"HOME": "/home/ray"}, cwd=JOB_CWD, now=NOW)
    assert path == f"/home/ray/rlflow_outputs/grpo-demo/{STAMP}"


@pytest.mark.parametrize("var", ["RAY_JOB_CONFIG_JSON_ENV_VAR", "RAY_JOB_ID"])
def test_ray_job_environment_alone_means_job(var):
    # A job submitted without --working-dir starts where the head was started, not in Ray's dirs.
    environ = {"HOME": "/home/ray", var: '{"runtime_env": {}}'}
    path = default_output_dir("e", environ=environ, cwd="/srv", now=NOW)
    assert path == f"/home/ray/rlflow_outputs/e/{STAMP}"


def test_output_root_variable_wins_locally_and_in_jobs():
    environ = {"HOME": "/home/u", "RLFLOW_OUTPUT_ROOT": "/mnt/shared/runs/"}
    expected = f"/mnt/shared/runs/exp/{STAMP}"
    assert default_output_dir("exp", environ=environ, cwd="/work/proj", now=NOW) == expected
    assert default_output_dir("exp", environ=environ, cwd=JOB_CWD, now=NOW) == expected


def test_output_root_expands_home(monkeypatch):
    monkeypatch.setenv("HOME", "/home/someone")
    path = default_output_dir("exp", environ={"RLFLOW_OUTPUT_ROOT": "~/runs"}, cwd="/x", now=NOW)
    assert path == f"/home/someone/runs/exp/{STAMP}"


def test_relative_output_root_is_rejected():
    with pytest.raises(ValueError, match="RLFLOW_OUTPUT_ROOT='runs' must be an absolute path"):
        default_output_dir("exp", environ={"RLFLOW_OUTPUT_ROOT": "runs"}, cwd="/x", now=NOW)


def test_nested_experiment_name_nests_folders():
    path = default_output_dir("team/grpo", environ={}, cwd="/w", now=NOW)
    assert path == f"/w/outputs/team/grpo/{STAMP}"


@pytest.mark.parametrize("name", ["", "  ", None, 3, "/abs/exp", "../escape", "a/../../b"])
def test_bad_experiment_name_names_the_key(name):
    with pytest.raises(ValueError, match="trainer.experiment_name"):
        default_output_dir(name, environ={}, cwd="/w", now=NOW)


def test_warns_when_a_job_writes_to_an_implicit_folder(caplog):
    with caplog.at_level(logging.WARNING, logger="rlflow"):
        default_output_dir("e", environ={"HOME": "/h"}, cwd=JOB_CWD, now=NOW)
    messages = [r.getMessage() for r in caplog.records]
    assert any("trainer.output_dir" in m and "/h/rlflow_outputs/e" in m for m in messages), messages
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rlflow"):
        default_output_dir("e", environ={"HOME": "/h"}, cwd="/w", now=NOW)
    assert not caplog.records


@pytest.mark.parametrize(
    "path, expected",
    [
        (JOB_CWD, True),
        ("/tmp/ray/session_latest/runtime_resources/pip/abc", True),
        ("/tmp/ray/session_2026/logs", False),
        ("/home/u/runtime_resources/x", False),  # only under a Ray session folder
        ("/work/proj", False),
    ],
)
def test_is_ray_temporary_dir(path, expected):
    assert is_ray_temporary_dir(path) is expected


def test_is_ray_job_driver_checks_env_then_cwd():
    assert is_ray_job_driver({}, cwd=JOB_CWD)
    assert is_ray_job_driver({"RAY_JOB_ID": "01000000"}, cwd="/w")
    assert not is_ray_job_driver({"RAY_JOB_ID": ""}, cwd="/w")
    assert not is_ray_job_driver({}, cwd="/w")
