"""Metrics sinks: one flat JSON object per step in metrics.jsonl, and a console line; the
prompt ledger (ledger.jsonl) of which dataset rows each step trained on."""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from typing import Any, Iterator

from rlflow.utils.atomic import write_text


class PhaseTimer:
    """Collects ``timing/<phase>_s`` for one step."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[f"timing/{name}_s"] = self.timings.get(f"timing/{name}_s", 0.0) + time.perf_counter() - start


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return value


def append_jsonl(path: str, row: dict[str, Any]) -> None:
    """Append one JSON line, flushed at once, so a killed run keeps every finished step."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def truncate_jsonl(path: str, step: int) -> list[dict[str, Any]]:
    """Atomically drop the rows of ``path`` whose ``step`` is after ``step``; returns the rest."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    kept = [r for r in rows if int(r.get("step", 0)) <= step]
    write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


class MetricsLog:
    """Appends each step's metrics to ``<output_dir>/metrics.jsonl`` (flushed every step, so a
    killed run keeps every finished step) and keeps them in memory for the Python API."""

    CONSOLE_KEYS = (
        ("reward/mean", "reward"),
        ("val/reward/mean", "val_reward"),
        ("actor/pg_loss", "pg_loss"),
        ("actor/entropy", "entropy"),
        ("actor/kl", "kl"),
        ("response_length/mean", "resp_len"),
        ("timing/step_s", "step_s"),
    )

    def __init__(self, output_dir: str) -> None:
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.history: list[dict[str, Any]] = []

    def log(self, metrics: dict[str, Any]) -> None:
        row = {k: _jsonable(v) for k, v in metrics.items()}
        self.history.append(row)
        append_jsonl(self.path, row)

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` (a resumed run redoes those steps)."""
        if os.path.isfile(self.path):
            self.history = truncate_jsonl(self.path, step)

    @classmethod
    def console_line(cls, metrics: dict[str, Any]) -> str:
        parts = [f"step {metrics.get('step')}"]
        for key, short in cls.CONSOLE_KEYS:
            if key in metrics and metrics[key] is not None:
                parts.append(f"{short} {metrics[key]:.4g}")
        return " | ".join(parts)


class PromptLedger:
    """``<output_dir>/ledger.jsonl``: one line per step, ``{"step": k, "indices": [...]}``, the
    dataset rows whose prompts step k trained on (every generation round of the step). Over an
    epoch, a run that was killed and resumed must list each row exactly once, like one that was
    not; the metrics stay scalars for the trackers, so the lists live here."""

    def __init__(self, output_dir: str) -> None:
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, "ledger.jsonl")

    def log(self, step: int, indices: list[int]) -> None:
        append_jsonl(self.path, {"step": int(step), "indices": [int(i) for i in indices]})

    def truncate_after(self, step: int) -> None:
        """Drop the steps after ``step``: a resumed run trains them again."""
        truncate_jsonl(self.path, step)


def read_metrics(path: str) -> list[dict[str, Any]]:
    """Read a metrics.jsonl file (or the folder holding one)."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
