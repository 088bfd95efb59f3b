"""Every start-up mistake the driver can know about: exactly one ``rlflow:`` line naming the key
or file (and the fix), exit status 2, and no Ray started.

The cases run ``rlflow.main.main()`` in this process (they must not start Ray, so nothing needs
a fresh process) and check ``ray.is_initialized()`` afterwards. Two cases that are about the
cluster itself, and one that checks the real ``python -m rlflow.main`` exit status, run as
subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from rlflow.main import main as rlflow_main

pytestmark = pytest.mark.before_ray


def write_rows(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def good_row(i=0, content="3+4=", data_source="arithmetic", truth="7"):
    return {"data_source": data_source, "prompt": [{"role": "user", "content": content}], "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": truth}, "extra_info": {"index": i}}


def demo_model_copy(tmp_path, name="model"):
    from rlflow.demo.assets import ensure_demo_model

    target = tmp_path / name
    shutil.copytree(ensure_demo_model(), target)
    return target


def tiny_model_without_pad(tmp_path):
    target = demo_model_copy(tmp_path, "nopad")
    cfg_path = target / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("pad_token", "eos_token"):
        cfg.pop(key, None)
    cfg_path.write_text(json.dumps(cfg))
    special = target / "special_tokens_map.json"
    if special.exists():
        special.unlink()
    return str(target)


def model_without_config(t):
    target = demo_model_copy(t)
    (target / "config.json").unlink()
    return [f"model.path={target}"]


def truncated_weights(t):
    target = demo_model_copy(t)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    return [f"model.path={target}"]


def garbage_weights(t):
    target = demo_model_copy(t)
    (target / "model.safetensors").write_bytes(b"\xff" * 64)
    return [f"model.path={target}"]


def broken_tokenizer(t):
    target = demo_model_copy(t, "tok")
    (target / "tokenizer.json").write_text("{ not json")
    return [f"model.tokenizer_path={target}"]


def reward_file(t, source, name="compute_score"):
    path = t / "my_reward.py"
    path.write_text(source)
    return [f"reward.custom_fn.path={path}", f"reward.custom_fn.name={name}"]


def output_dir_through_a_file(t):
    (t / "plain_file").write_text("x")
    return [f"trainer.output_dir={t / 'plain_file' / 'out'}"]


def rows_file(t, name, rows):
    return [f"data.train_files=[{write_rows(t / name, rows)}]"]


CASES = {
    # data
    "corrupt parquet": (lambda t: [f"data.train_files=[{(t / 'bad.parquet').write_bytes(b'not parquet') and t / 'bad.parquet'}]"], "bad.parquet"),
    "missing column": (lambda t: rows_file(t, "nocol.parquet", [{"question": "x"}] * 40), "prompt"),
    "bad chat format": (lambda t: rows_file(t, "chat.parquet", [{**good_row(), "prompt": "not messages"}] * 40), "row"),
    "overlong prompt": (lambda t: [*rows_file(t, "long.parquet", [good_row(content="1+1=" * 10)] * 40),
                                   "data.filter_overlong_prompts=false", "data.truncation=error"], "max_prompt_length"),
    "empty after filtering": (lambda t: rows_file(t, "all_long.parquet", [good_row(content="1+1=" * 10)] * 40), "dropped"),
    "data_source without scorer": (lambda t: rows_file(t, "src.parquet", [good_row(i, data_source="my/source") for i in range(40)]),
                                   "'my/source' has no reward scorer"),
    "null ground truth": (lambda t: rows_file(t, "nogt.parquet", [good_row(i, truth=None) for i in range(40)]),
                          "row 0 of"),
    # config values
    "batch sizes": (lambda t: ["data.train_batch_size=30", "actor.ppo_mini_batch_size=8"], "actor.ppo_mini_batch_size"),
    "negative learning rate": (lambda t: ["actor.optim.lr=-1e-6"], "actor.optim.lr"),
    "negative temperature": (lambda t: ["rollout.temperature=-0.5"], "rollout.temperature"),
    "unknown dtype": (lambda t: ["model.dtype=float8"], "model.dtype"),
    "grpo with one response": (lambda t: ["rollout.n=1"], "rollout.n=1"),
    "rloo with one response": (lambda t: ["algorithm.adv_estimator=rloo", "rollout.n=1"], "rollout.n=1"),
    "negative total steps": (lambda t: ["trainer.total_steps=-3"], "trainer.total_steps"),
    "unknown kl kind": (lambda t: ["actor.use_kl_loss=true", "actor.kl_loss_type=k9"], "actor.kl_loss_type"),
    "partial rollouts outside async": (lambda t: ["rollout.partial_rollout=true"], "rollout.partial_rollout"),
    "negative staleness bound": (lambda t: ["rollout.max_weight_staleness=-1"], "rollout.max_weight_staleness"),
    # multi-turn agent settings
    "agent without tools": (lambda t: ["agent.enable=true"], "agent.tools"),
    "unknown tool": (lambda t: ["agent.enable=true", "agent.tools=[abacus]"], "agent.tools"),
    "unknown tool parser": (lambda t: ["agent.enable=true", "agent.tools=[calculator]", "agent.tool_parser=xml"],
                            "agent.tool_parser"),
    "unknown environment": (lambda t: ["agent.enable=true", "agent.environment=chess"], "agent.environment"),
    "missing environment file": (lambda t: ["agent.enable=true", "agent.environment=Env",
                                            f"agent.environment_path={t / 'no_env.py'}"], "no_env.py"),
    "zero turns": (lambda t: ["agent.enable=true", "agent.tools=[calculator]", "agent.max_turns=0"], "agent.max_turns"),
    # model and tokenizer files
    "missing model path": (lambda t: [f"model.path={t / 'no_model'}"], "model.path"),
    "model folder without config.json": (model_without_config, "config.json"),
    "truncated safetensors": (truncated_weights, "model.safetensors"),
    "garbage safetensors": (garbage_weights, "model.safetensors"),
    "tokenizer without pad": (lambda t: [f"model.path={tiny_model_without_pad(t)}"], "pad"),
    "tokenizer that cannot load": (broken_tokenizer, "model.tokenizer_path"),
    # reward code
    "reward file with a syntax error": (lambda t: reward_file(t, "def compute_score(:\n"), "my_reward.py"),
    "reward function with a wrong signature": (lambda t: reward_file(t, "def compute_score(text):\n    return 1.0\n"),
                                               "compute_score"),
    "reward name not in file": (lambda t: reward_file(t, "def other(**kw):\n    return 1.0\n"), "compute_score"),
    # output folder
    "output dir through a file": (output_dir_through_a_file, "trainer.output_dir"),
    "resume from a folder that is no checkpoint": (lambda t: [f"trainer.resume_mode={t}"], "trainer.resume_mode"),
}


@pytest.fixture
def cli(tmp_path, capsys):
    """Run the CLI in this process; returns ``(status, the rlflow: lines, stderr)``."""
    assert not ray.is_initialized()

    def run(*overrides, recipe="grpo"):
        args = [f"+recipe={recipe}", "trainer.progress_bar=false", *overrides]
        if not any(a.startswith("trainer.output_dir=") for a in overrides):
            args.append(f"trainer.output_dir={tmp_path / 'out'}")
        capsys.readouterr()
        status = rlflow_main(args)
        err = capsys.readouterr().err
        return status, [ln for ln in err.splitlines() if ln.startswith("rlflow:")], err

    yield run
    started = ray.is_initialized()
    if started:
        ray.shutdown()
    assert not started, "Ray was started for a start-up error"


@pytest.mark.parametrize("case", sorted(CASES))
def test_start_up_error_is_one_line_naming_the_fix(tmp_path, cli, case):
    make_overrides, needle = CASES[case]
    status, lines, err = cli(*make_overrides(tmp_path))
    assert status == 2, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err
    # Nothing half-written: no checkpoint appears for a run that never started.
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_dpo_checks_its_model_before_starting(tmp_path, cli):
    status, lines, err = cli(*truncated_weights(tmp_path), recipe="dpo")
    assert status == 2 and len(lines) == 1 and "model.safetensors" in lines[0], err[-2000:]


def test_unwritable_output_dir(tmp_path, cli):
    target = tmp_path / "readonly"
    target.mkdir()
    mounted = False
    if os.geteuid() == 0:  # root writes through permission bits: mount a read-only file system
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target)],
                                 capture_output=True).returncode == 0
        if not mounted:
            pytest.skip("running as root without permission to mount a read-only tmpfs")
    else:
        target.chmod(0o555)
    try:
        status, lines, err = cli(f"trainer.output_dir={target}")
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(target)], check=True)
        else:
            target.chmod(0o755)
    assert status == 2 and len(lines) == 1, err[-2000:]
    assert "trainer.output_dir" in lines[0] and "not writable" in lines[0]


def test_second_run_on_the_same_output_dir_stops_at_once(tmp_path, cli):
    from rlflow.trainer.startup import RunLock

    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("first run's config\n")
    lock = RunLock(str(out))  # the first run, still going
    try:
        status, lines, err = cli()
    finally:
        lock.release()
    assert status == 2 and len(lines) == 1, err[-2000:]
    assert "is in use by another run" in lines[0] and f"pid {os.getpid()}" in lines[0]
    assert (out / "config.yaml").read_text() == "first run's config\n", "the first run's files are untouched"


def test_a_lock_left_by_a_dead_run_does_not_block(tmp_path, cli):
    out = tmp_path / "out"
    (out / "checkpoints" / ".tmp-global_step_4-dead").mkdir(parents=True)
    (out / ".rlflow.lock").write_text("pid 999999 on some-host since 2020-01-01 00:00:00\n")
    # The run gets past the lock and stops at the next check, the resume path (still before Ray);
    # on its way it removed the half-written checkpoint of the dead run.
    status, lines, err = cli(f"trainer.resume_mode={tmp_path / 'nowhere'}")
    assert status == 2 and len(lines) == 1 and "trainer.resume_mode" in lines[0], err[-2000:]
    assert not (out / "checkpoints" / ".tmp-global_step_4-dead").exists()


def test_verl_kl_names_are_accepted():
    import rlflow
    from rlflow.trainer.config_checks import check_config

    for name in ("kl", "mse", "low_var_kl", "abs", "k3+", "low_var_kl+"):
        check_config(rlflow.compose_config("ppo", overrides=["algorithm.use_kl_in_reward=true",
                                                             f"algorithm.kl_penalty={name}"]))
        check_config(rlflow.compose_config("grpo", overrides=["actor.use_kl_loss=true", f"actor.kl_loss_type={name}"]))


# ------------------------------------------------------------------ export


def fake_checkpoint(tmp_path):
    import rlflow
    from omegaconf import OmegaConf

    from rlflow.demo.assets import ensure_demo_model

    out = tmp_path / "run"
    ckpt = out / "checkpoints" / "global_step_2"
    (ckpt / "actor").mkdir(parents=True)
    shutil.copy(os.path.join(ensure_demo_model(), "model.safetensors"), ckpt / "actor" / "model.safetensors")
    config = OmegaConf.to_yaml(rlflow.compose_config("grpo"))
    (ckpt / "config.yaml").write_text(config)
    (ckpt / "trainer_state.json").write_text("{}")
    (out / "config.yaml").write_text(config)
    (out / "metrics.jsonl").write_text("")
    return out, ckpt


@pytest.mark.parametrize("where", ["non-empty folder", "the output folder", "inside the output folder",
                                   "inside the checkpoint", "a file"])
def test_export_refuses_to_write_among_files_it_does_not_own(tmp_path, capsys, where):
    from rlflow.export import main as export_main

    out, ckpt = fake_checkpoint(tmp_path)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    (tmp_path / "file.txt").write_text("keep me")
    target = {"non-empty folder": foreign, "the output folder": out, "inside the output folder": out / "hf",
              "inside the checkpoint": ckpt / "hf", "a file": tmp_path / "file.txt"}[where]
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert export_main([str(ckpt), str(target)]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("rlflow.export:")]
    assert len(lines) == 1 and "export target" in lines[0], lines
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before, "nothing was written"
    # A new folder elsewhere works, and loads as a model.
    fresh = tmp_path / "exported"
    assert export_main([str(ckpt), str(fresh)]) == 0
    assert (fresh / "model.safetensors").read_bytes() == (ckpt / "actor" / "model.safetensors").read_bytes()
    assert (fresh / "config.json").is_file()


# ------------------------------------------------------------------ as a real process


def run_process(tmp_path, *overrides, timeout=300, **env_vars):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HOME=str(tmp_path), **env_vars)
    env.pop("RLFLOW_DEBUG", None)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "rlflow.main", "+recipe=grpo", "trainer.progress_bar=false",
                           f"trainer.output_dir={tmp_path / 'out'}", *overrides],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("rlflow:")]
    return proc, lines


def test_process_exit_status_and_no_ray(tmp_path):
    # A Ray started by mistake would put its session folder under RAY_TMPDIR.
    proc, lines = run_process(tmp_path, *truncated_weights(tmp_path), RAY_TMPDIR=str(tmp_path / "ray"))
    assert proc.returncode == 2 and len(lines) == 1 and "model.safetensors" in lines[0], proc.stderr[-2000:]
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert not list(tmp_path.glob("**/session_*")), "no Ray session folder"


@pytest.mark.parametrize("case, overrides, needle", [
    ("more workers than cpus", ["actor.num_workers=4", "actor.cpus_per_worker=1", "actor.ppo_mini_batch_size=32"],
     "actor.num_workers"),
    ("unreachable ray", ["cluster.address=127.0.0.1:1"], "cluster.address"),
])
def test_cluster_errors_are_one_line(tmp_path, case, overrides, needle):
    proc, lines = run_process(tmp_path, *overrides)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_an_error_raised_in_a_worker_is_shown_as_its_one_line(capsys, monkeypatch):
    """How a reward function's broken contract reaches the CLI: raised in the reward worker,
    wrapped by Ray and by the worker group (built here as they are, without starting Ray)."""
    from ray.exceptions import RayTaskError

    import rlflow.main as cli_main
    from rlflow.distributed.worker_group import WorkerCallError
    from rlflow.errors import RewardError

    line = "reward function 'score' in '/x/r.py' returned a NoneType (None); it must return a float"
    try:
        raise RewardError(line)
    except RewardError as exc:
        wrapped = RayTaskError("RewardWorker.compute_reward", "Traceback (most recent call last): ...", exc)
        wrapped = wrapped.as_instanceof_cause()
    outer = WorkerCallError("worker reward-0 raised in 'compute_reward': ...", "reward", 0, "compute_reward")
    outer.__cause__ = wrapped

    def build_trainer(cfg):
        raise outer

    monkeypatch.setattr("rlflow.api.build_trainer", build_trainer)
    assert cli_main.main(["+recipe=grpo"]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("rlflow:")]
    assert lines == [f"rlflow: error: {line}"]
