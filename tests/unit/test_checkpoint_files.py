"""Checkpoint folder mechanics and single-process worker state round trips."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from rlflow.errors import ConfigError
from rlflow.trainer import checkpoint as ckpt
from rlflow.workers.checkpointing import load_worker_state, save_worker_state


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def train_step(model, opt, sched, x):
    opt.zero_grad()
    model(x).pow(2).sum().backward()
    opt.step()
    sched.step()


def test_worker_state_round_trip_gives_identical_next_step(tmp_path):
    x = torch.randn(3, 4)
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    train_step(model, opt, sched, x)
    save_worker_state(str(tmp_path / "actor"), 0, model, opt, sched, {"global_step": 1})
    expected_rand = torch.rand(3)
    train_step(model, opt, sched, x)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    fresh = tiny_model()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda s: 1.0 / (s + 1))
    torch.manual_seed(123)  # scrambled; the checkpoint restores the RNG
    extra = load_worker_state(str(tmp_path / "actor"), 0, fresh, fresh_opt, fresh_sched)
    assert extra == {"global_step": 1}
    assert torch.equal(torch.rand(3), expected_rand)
    train_step(fresh, fresh_opt, fresh_sched, x)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_driver_rng_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    ckpt.save_rng(str(tmp_path / "rng.pt"))
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ckpt.load_rng(str(tmp_path / "rng.pt"))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def test_atomic_save_retention_and_resume_discovery(tmp_path):
    out = str(tmp_path)
    for step in (4, 8, 12):
        ckpt.save_checkpoint(out, step, {"step": step}, "a: 1\n", lambda d: open(os.path.join(d, "part"), "w").close(), max_to_keep=2)
    steps = [s for s, _ in ckpt.list_checkpoints(out)]
    assert steps == [8, 12]
    assert ckpt.resolve_resume_path(out, "auto").endswith("global_step_12")
    assert ckpt.resolve_resume_path(out, "disable") is None
    with open(os.path.join(ckpt.checkpoints_root(out), ckpt.LATEST_FILE)) as f:
        assert f.read() == "12"

    def crash(folder):
        open(os.path.join(folder, "part"), "w").close()
        raise RuntimeError("worker died while saving")

    with pytest.raises(RuntimeError):
        ckpt.save_checkpoint(out, 16, {"step": 16}, "", crash)
    # The failed save leaves nothing that looks like a checkpoint; the last good one stays.
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [8, 12]
    assert not [n for n in os.listdir(ckpt.checkpoints_root(out)) if n.startswith(".tmp-")]
    assert ckpt.load_trainer_state(ckpt.resolve_resume_path(out, "auto")) == {"step": 12}


def test_resume_path_must_be_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="trainer.resume_mode"):
        ckpt.resolve_resume_path(str(tmp_path), str(tmp_path / "nope"))
