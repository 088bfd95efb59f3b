"""Experiment trackers selected by ``trainer.logger`` (console and metrics.jsonl are always on).

TensorBoard, Weights & Biases and MLflow are optional dependencies, imported only when chosen,
with a one-line error naming the package to install when missing. W&B honours ``WANDB_MODE``
(``offline`` works with no network); MLflow logs to ``<output_dir>/mlruns`` unless
``MLFLOW_TRACKING_URI`` says otherwise.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

from rlflow.errors import ConfigError

TRACKERS = ("console", "tensorboard", "wandb", "mlflow")


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def _require(module: str, package: str, name: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ConfigError(
            f"trainer.logger includes '{name}' but the '{package}' package is not installed: "
            f"pip install {package} (or remove '{name}' from trainer.logger)"
        ) from None


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardTracker:
    def __init__(self, output_dir: str) -> None:
        _require("tensorboard", "tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = os.path.join(output_dir, "tensorboard")
        self.writer = SummaryWriter(log_dir=self.log_dir)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in _numeric(metrics).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, output_dir: str, project: str, experiment: str, config: dict) -> None:
        wandb = _require("wandb", "wandb", "wandb")
        self.run = wandb.init(
            project=project, name=experiment, config=config, dir=output_dir,
            mode=os.environ.get("WANDB_MODE", "offline"), reinit="finish_previous",
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(_numeric(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class MLflowTracker:
    def __init__(self, output_dir: str, project: str, experiment: str, config: dict) -> None:
        mlflow = _require("mlflow", "mlflow-skinny", "mlflow")
        self.mlflow = mlflow
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # A plain folder needs no server or database; MLflow 3 asks for an explicit opt-in.
            uri = "file://" + os.path.join(output_dir, "mlruns")
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(project)
        self.run = mlflow.start_run(run_name=experiment)
        flat = _flatten(config)
        # MLflow caps a param value at a few hundred characters and a batch at 100 params.
        items = [(k, str(v)[:250]) for k, v in flat.items()]
        for start in range(0, len(items), 100):
            mlflow.log_params(dict(items[start : start + 100]))

    def log(self, metrics: dict[str, float], step: int) -> None:
        clean = {k.replace("@", "_"): v for k, v in _numeric(metrics).items()}
        self.mlflow.log_metrics(clean, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def build_trackers(names: list[str], output_dir: str, project: str, experiment: str, config: dict) -> list[Tracker]:
    trackers: list[Tracker] = []
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"trainer.logger entry '{name}' is unknown: use any of {', '.join(TRACKERS)}")
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(output_dir))
        elif name == "wandb":
            trackers.append(WandbTracker(output_dir, project, experiment, config))
        elif name == "mlflow":
            trackers.append(MLflowTracker(output_dir, project, experiment, config))
    return trackers
