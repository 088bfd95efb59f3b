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


def _save_step(out, step, write_parts):
    return ckpt.save_checkpoint(str(out), step, {"step": step}, "a: 1\n", write_parts)


def _assert_step_4_survives(out, model):
    root = ckpt.checkpoints_root(str(out))
    assert [s for s, _ in ckpt.list_checkpoints(str(out))] == [4]
    assert not [n for n in os.listdir(root) if n.startswith(".tmp-")], "the partial checkpoint is removed"
    with open(os.path.join(root, ckpt.LATEST_FILE)) as f:
        assert f.read() == "4"
    # ... and resumable: the worker state loads back into a fresh model
    path = ckpt.resolve_resume_path(str(out), "auto")
    assert ckpt.load_trainer_state(path) == {"step": 4}
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    load_worker_state(os.path.join(path, "actor"), 0, fresh, None, None)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


@pytest.mark.parametrize("writer", ["safetensors", "torch.save"])
def test_disk_full_during_a_save_on_a_real_full_disk(tmp_path, writer):
    """A 2 MiB tmpfs holds the first checkpoint of a tiny model but not the next one's 4 MiB
    of weights (safetensors) or optimiser state (torch.save, whose error does not say why)."""
    import subprocess

    from safetensors.torch import save_file

    from rlflow.errors import DiskFullError

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); the injected ENOSPC test covers the logic")
    try:
        model = tiny_model()
        _save_step(disk, 4, lambda d: save_worker_state(os.path.join(d, "actor"), 0, model, None, None, {}))

        def big_weights(folder):
            os.makedirs(os.path.join(folder, "actor"))
            if writer == "safetensors":
                save_file({"w": torch.zeros(1 << 20)}, os.path.join(folder, "actor", "model.safetensors"))
            else:
                torch.save({"w": torch.zeros(1 << 20)}, os.path.join(folder, "actor", "optimizer.pt"))

        with pytest.raises(DiskFullError, match="the disk is full: writing checkpoint global_step_8") as info:
            _save_step(disk, 8, big_weights)
        assert "global_step_4 is intact" in str(info.value)
        _assert_step_4_survives(disk, model)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)  # lazy: the failed writer may hold a file


def test_disk_full_reported_from_a_worker_error(tmp_path):
    """ENOSPC injected where a worker's write fails (no disk is filled): the error arrives
    wrapped, as a worker's does, and is still recognised."""
    import errno

    from rlflow.errors import DiskFullError

    model = tiny_model()
    _save_step(tmp_path, 4, lambda d: save_worker_state(os.path.join(d, "actor"), 0, model, None, None, {}))

    def full(folder):
        os.makedirs(os.path.join(folder, "actor"))
        open(os.path.join(folder, "actor", "model.safetensors"), "wb").close()
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise RuntimeError("worker actor-0 raised in 'save_checkpoint'") from exc

    with pytest.raises(DiskFullError, match="the disk is full"):
        _save_step(tmp_path, 8, full)
    _assert_step_4_survives(tmp_path, model)

    # Other failures stay what they are.
    with pytest.raises(RuntimeError, match="boom"):
        _save_step(tmp_path, 8, lambda d: (_ for _ in ()).throw(RuntimeError("boom")))


def test_a_start_removes_half_written_checkpoints(tmp_path):
    import rlflow
    from rlflow.trainer.startup import prepare_output_dir

    root = tmp_path / "checkpoints"
    (root / ".tmp-global_step_8-abcd" / "actor").mkdir(parents=True)
    (root / ".tmp-latest_checkpointed_iteration.txt.1234").write_text("8")
    (root / "global_step_4").mkdir()
    (root / "global_step_4" / "trainer_state.json").write_text("{}")
    cfg = rlflow.compose_config("grpo", overrides=[f"trainer.output_dir={tmp_path}"])
    output_dir, lock = prepare_output_dir(cfg)
    lock.release()
    assert sorted(os.listdir(root)) == ["global_step_4"]
