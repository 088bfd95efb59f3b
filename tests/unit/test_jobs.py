"""rlflow.jobs without a cluster: the entrypoint it builds and the errors it raises early.

Submission itself runs against a real Ray head in tests/e2e/test_job_submit.py.
"""

from __future__ import annotations

import shlex

import pytest

from rlflow import jobs
from rlflow.errors import ConfigError

# Nothing listens here; the tests below must fail before any connection is tried.
UNREACHABLE = "http://127.0.0.1:9"


def test_entrypoint_is_the_cli_with_quoted_overrides():
    entry = jobs.build_entrypoint(
        "grpo", ["rollout.custom_resources={node_worker:1}", "trainer.experiment_name='my run'"]
    )
    assert shlex.split(entry) == [
        "python", "-m", "rlflow.main", "+recipe=grpo",
        "rollout.custom_resources={node_worker:1}", "trainer.experiment_name='my run'",
        "trainer.progress_bar=false",
    ]


@pytest.mark.parametrize("given", ["trainer.progress_bar=true", "++trainer.progress_bar=true"])
def test_entrypoint_keeps_an_explicit_progress_bar_setting(given):
    args = shlex.split(jobs.build_entrypoint("grpo", [given]))
    assert args[-1] == given
    assert sum("progress_bar" in a for a in args) == 1


def test_entrypoint_without_recipe_and_with_custom_python():
    args = shlex.split(jobs.build_entrypoint(None, ["+recipe=grpo"], python="/opt/venv/bin/python"))
    assert args == ["/opt/venv/bin/python", "-m", "rlflow.main", "+recipe=grpo", "trainer.progress_bar=false"]


@pytest.mark.parametrize("overrides", ["rollout.n=4 actor.optim.lr=1e-3", None, [1], [""]])
def test_overrides_must_be_a_list_of_strings(overrides):
    with pytest.raises(TypeError, match="overrides"):
        jobs.build_entrypoint("grpo", overrides)


def test_misspelt_key_fails_before_submission():
    with pytest.raises(ConfigError, match="actor.learning_rate"):
        jobs.submit_run(UNREACHABLE, "grpo", ["actor.learning_rate=1e-3"])


def test_unknown_recipe_fails_before_submission():
    with pytest.raises(ConfigError, match="no_such_recipe"):
        jobs.submit_run(UNREACHABLE, "no_such_recipe", [])


def test_missing_working_dir_is_named(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        jobs.submit_run(UNREACHABLE, "grpo", [], working_dir=str(missing))


def test_working_dir_given_twice_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="working_dir is given twice"):
        jobs.submit_run(UNREACHABLE, "grpo", [], working_dir=str(tmp_path), runtime_env={"working_dir": "."})


def test_runtime_env_must_be_a_dict():
    with pytest.raises(TypeError, match="runtime_env"):
        jobs.submit_run(UNREACHABLE, "grpo", [], runtime_env=["env_vars"])


def test_ray_client_address_is_rejected_with_the_fix():
    with pytest.raises(ValueError, match="dashboard"):
        jobs.submit_run("ray://head:10001", "grpo", [], validate=False)


def test_follow_logs_needs_a_job_id():
    with pytest.raises(TypeError, match="job_id"):
        jobs.follow_logs(UNREACHABLE, "")
