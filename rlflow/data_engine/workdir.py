"""The engine's work folder: one sub-folder per stage, one parquet file per finished shard.

A shard file is written to a temporary name and renamed, so after a crash every shard file on
disk is complete and a restart only computes the missing ones. A stage is finished when its
``_DONE.json`` exists; the marker records the settings the stage ran with, so running again
with different settings is caught instead of silently mixing results.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from rlflow.errors import ConfigError
from rlflow.utils.atomic import atomic_file, write_text

DONE = "_DONE.json"
SHARD = re.compile(r"^shard_(\d{5})\.parquet$")


class WorkDir:
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        os.makedirs(self.root, exist_ok=True)

    def stage_dir(self, stage: str) -> str:
        path = os.path.join(self.root, stage)
        os.makedirs(path, exist_ok=True)
        return path

    def shard_path(self, stage: str, index: int) -> str:
        return os.path.join(self.stage_dir(stage), f"shard_{index:05d}.parquet")

    def finished_shards(self, stage: str) -> set[int]:
        folder = self.stage_dir(stage)
        return {int(m.group(1)) for m in map(SHARD.match, os.listdir(folder)) if m}

    def write_shard(self, stage: str, index: int, rows: list[dict[str, Any]]) -> None:
        write_parquet(rows, self.shard_path(stage, index))

    def read_stage(self, stage: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for index in sorted(self.finished_shards(stage)):
            rows.extend(pq.read_table(self.shard_path(stage, index)).to_pylist())
        return rows

    def done_settings(self, stage: str) -> dict[str, Any] | None:
        path = os.path.join(self.stage_dir(stage), DONE)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def check_settings(self, stage: str, settings: dict[str, Any]) -> None:
        """Refuse to resume or skip a stage that ran with different settings."""
        path = os.path.join(self.stage_dir(stage), "_SETTINGS.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                previous = json.load(f)
            if previous != settings:
                changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
                raise ConfigError(
                    f"stage '{stage}' in {self.root} ran with different settings ({', '.join(changed)}): "
                    f"add engine.rerun=[{stage}] to recompute it, or use another engine.work_dir"
                )
        else:
            _write_json(path, settings)

    def mark_done(self, stage: str, info: dict[str, Any]) -> None:
        _write_json(os.path.join(self.stage_dir(stage), DONE), info)

    def clear(self, stages: Iterable[str]) -> None:
        for stage in stages:
            shutil.rmtree(os.path.join(self.root, stage), ignore_errors=True)


def _write_json(path: str, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True))


def write_parquet(rows: list[dict[str, Any]], path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_file(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
