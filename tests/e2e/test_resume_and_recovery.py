"""Reliability: exact resume after SIGKILL, recovery from a dead worker, export to HF."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

COMPARED = ("reward/mean", "actor/pg_loss", "actor/kl", "actor/entropy", "actor/grad_norm", "response_length/mean")


def launch(out: Path, *overrides: str) -> subprocess.Popen:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HOME=str(out.parent))
    env.pop("RAY_ADDRESS", None)
    args = [sys.executable, "-m", "rlflow.main", "+recipe=grpo", f"trainer.output_dir={out}",
            "trainer.progress_bar=false", "cluster.num_cpus=2", *overrides]
    return subprocess.Popen(args, env=env, cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def finish(proc: subprocess.Popen, timeout: float = 400) -> str:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output[-3000:]
    return output


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


def kill_run_after(out: Path, proc: subprocess.Popen, steps: int, timeout: float = 300) -> None:
    """SIGKILL the driver and every Ray process it began once ``steps`` steps are logged."""
    deadline = time.monotonic() + timeout
    try:
        while len(rows(out)) < steps:
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended early"
            time.sleep(0.05)
    finally:
        kill_group(proc)


def kill_worker_after(out: Path, proc: subprocess.Popen, role: str, rank: int, steps: int) -> str:
    """SIGKILL one worker of ``role`` (its pid read from the run's worker listing) once ``steps``
    steps are logged; the run must then finish by itself. Returns its whole output."""
    pid, lines = None, []
    try:
        for line in proc.stdout:
            lines.append(line)
            match = re.search(rf"role {role}: .*rank {rank} pid (\d+)", line)
            if match and pid is None:
                pid = int(match.group(1))
            if pid is not None and len(rows(out)) >= steps:
                os.kill(pid, signal.SIGKILL)
                break
        rest, _ = proc.communicate(timeout=400)
    except BaseException:
        kill_group(proc)
        raise
    output = "".join(lines) + rest
    assert proc.returncode == 0, output[-3000:]
    return output


@pytest.mark.long
def test_sigkill_during_step_7_then_resume_matches_uninterrupted_run(tmp_path):
    common = ("trainer.total_steps=12", "trainer.save_freq=4")
    run_a = tmp_path / "a"
    finish(launch(run_a, *common))
    expected = {r["step"]: r for r in rows(run_a)}
    assert sorted(expected) == list(range(1, 13))

    run_b = tmp_path / "b"
    kill_run_after(run_b, launch(run_b, *common), steps=6)  # step 7 is under way
    assert (run_b / "checkpoints" / "global_step_4" / "trainer_state.json").is_file()
    assert not (run_b / "checkpoints" / "global_step_8").exists()

    output = finish(launch(run_b, *common, "trainer.resume_mode=auto"))
    assert "resumed from" in output and "global_step_4" in output
    resumed = {r["step"]: r for r in rows(run_b)}
    assert sorted(resumed) == list(range(1, 13)), "steps 5-6 of the killed run are redone once"
    for step in range(9, 13):
        for key in COMPARED:
            assert resumed[step][key] == expected[step][key], (step, key)


@pytest.mark.long
def test_killed_actor_worker_is_recovered_and_counted(tmp_path):
    out = tmp_path / "recover"
    proc = launch(out, "trainer.total_steps=8", "trainer.save_freq=2", "trainer.max_restarts=2")
    # The recipe's one actor worker, which also samples (two FSDP ranks: test_one_step_off.py).
    output = kill_worker_after(out, proc, "actor", rank=0, steps=3)
    assert "restart 1 of 2" in output
    final = rows(out)
    assert [r["step"] for r in final] == list(range(1, 9))
    assert final[-1]["trainer/restarts"] == 1.0
    # Checkpoints written before the failure still load.
    state = json.loads((out / "checkpoints" / "global_step_2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2


def test_checkpoint_export_loads_with_from_pretrained_and_matches_policy(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from rlflow.export import main as export_main

    out = tmp_path / "export"
    finish(launch(out, "trainer.total_steps=2", "trainer.save_freq=2", "trainer.export_hf=true"))
    target = tmp_path / "hf"
    assert export_main([str(out / "checkpoints" / "global_step_2"), str(target)]) == 0
    model = AutoModelForCausalLM.from_pretrained(target)
    trained = load_file(out / "checkpoints" / "global_step_2" / "actor" / "model.safetensors")
    for name, tensor in model.state_dict().items():
        if name in trained:
            assert torch.equal(tensor, trained[name]), name
    # The automatic export at the end of the run holds the same final weights.
    auto = AutoModelForCausalLM.from_pretrained(out / "hf_model")
    ids = torch.tensor([[3, 9, 16, 10, 19, 5, 4]])
    assert torch.allclose(auto(ids).logits, model(ids).logits)
    # ... and they really moved away from the initial model.
    from rlflow.demo.assets import ensure_demo_model

    initial = AutoModelForCausalLM.from_pretrained(ensure_demo_model())
    assert not torch.equal(model.state_dict()["model.embed_tokens.weight"], initial.state_dict()["model.embed_tokens.weight"])
