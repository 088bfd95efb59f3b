"""Each tracker writes something its own reader can load back."""

from __future__ import annotations

import glob
import os
import time

import pytest

from rlflow.errors import ConfigError
from rlflow.trainer.trackers import build_trackers

STEPS = [(1, {"reward/mean": 0.25, "actor/pg_loss": -0.5, "note": "text is skipped"}),
         (2, {"reward/mean": 0.75, "actor/pg_loss": -0.25})]


def write(names, tmp_path):
    trackers = build_trackers(names, str(tmp_path), "rlflow-test", "unit", {"a": {"b": 1}, "c": "x"})
    for step, metrics in STEPS:
        for tracker in trackers:
            tracker.log(metrics, step)
    for tracker in trackers:
        tracker.close()
    return trackers


def test_tensorboard_event_file_reads_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write(["tensorboard"], tmp_path)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("reward/mean")
    assert [(e.step, e.value) for e in events] == [(1, 0.25), (2, 0.75)]
    assert "note" not in acc.Tags()["scalars"]


def read_wandb_records(path):
    """Records of a .wandb file: a 7-byte file header, then a LevelDB-style log of 32 KiB
    blocks whose records carry (crc32, uint16 length, type) headers; FIRST/MIDDLE/LAST pieces
    of one record are joined."""
    import struct

    raw = open(path, "rb").read()
    assert raw[:4] == b":W&B", raw[:8]
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(raw):
        left = block - (pos % block)
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        piece = raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            pos += block - (pos % block) if pos % block else 0
            continue
        pending += piece
        if kind in (1, 4):  # FULL or LAST
            out.append(pending)
            pending = b""
    return out


def test_wandb_offline_run_reads_back(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    write(["wandb"], tmp_path)
    files = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    from wandb.proto import wandb_internal_pb2

    def history():
        rows = []
        for data in read_wandb_records(files[0]):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}
                rows.append((int(items["_step"]), float(items["reward/mean"])))
        return rows

    # wandb-core (a separate process) may still be flushing right after finish(); give it time.
    deadline = time.monotonic() + 30
    logged = history()
    while len(logged) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
        logged = history()
    assert logged == [(1, 0.25), (2, 0.75)]


def test_mlflow_local_run_reads_back(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import mlflow
    from mlflow.tracking import MlflowClient

    [tracker] = write(["mlflow"], tmp_path)
    client = MlflowClient(tracking_uri="file://" + os.path.join(tmp_path, "mlruns"))
    run_id = tracker.run.info.run_id
    history = client.get_metric_history(run_id, "reward/mean")
    assert [(m.step, m.value) for m in history] == [(1, 0.25), (2, 0.75)]
    assert client.get_run(run_id).data.params["a.b"] == "1"
    assert mlflow.active_run() is None


def test_unknown_tracker_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="trainer.logger entry 'tensorbored'"):
        build_trackers(["tensorbored"], str(tmp_path), "p", "e", {})


def test_missing_package_names_it(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("no wandb")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ConfigError, match="pip install wandb"):
        build_trackers(["wandb"], str(tmp_path), "p", "e", {})
