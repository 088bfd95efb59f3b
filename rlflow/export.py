"""Export a checkpoint's policy weights as a Hugging Face model folder.

    python -m rlflow.export <output_dir>/checkpoints/global_step_N <target_dir>

The folder gets the base model's config, generation config and tokenizer files plus the
trained ``model.safetensors``, so ``AutoModelForCausalLM.from_pretrained(target_dir)`` loads it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Optional, Sequence

from omegaconf import OmegaConf

from rlflow.errors import ConfigError
from rlflow.models.loading import resolve_model_path
from rlflow.utils.atomic import atomic_folder

# Files of an HF model folder that describe the model but hold no weights.
METADATA_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")


def _copy_metadata(base: str, folder: str) -> None:
    for name in os.listdir(base):
        if name.endswith(METADATA_SUFFIXES) and not name.endswith(".index.json"):
            shutil.copy2(os.path.join(base, name), os.path.join(folder, name))


def _rlflow_folder(path: str) -> Optional[str]:
    """What ``path`` is if it is a checkpoint or a run's output folder, else None."""
    if os.path.isfile(os.path.join(path, "trainer_state.json")):
        return "a checkpoint"
    if os.path.isfile(os.path.join(path, "config.yaml")) and (
        os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isfile(os.path.join(path, "metrics.jsonl"))
    ):
        return "a run's output folder"
    return None


def check_target(target: str) -> None:
    """Refuse a target that holds files, or that lies in a checkpoint or a run's output folder:
    an export never writes over or among files it does not own."""
    full = os.path.abspath(target)
    if os.path.exists(full) and (not os.path.isdir(full) or os.listdir(full)):
        raise ConfigError(
            f"export target '{target}' already exists and is not an empty folder: pick a new folder "
            "(an export never overwrites)"
        )
    folder = full
    while True:
        kind = _rlflow_folder(folder)
        if kind is not None:
            raise ConfigError(
                f"export target '{target}' lies inside {kind} ('{folder}'): pick a folder outside it"
            )
        up = os.path.dirname(folder)
        if up == folder:
            return
        folder = up


def export_from_actor_group(actor_group, model_cfg, target: str) -> str:
    """Write the live policy of a running trainer (its actor WorkerGroup) as an HF folder."""
    import ray
    from safetensors.torch import save_file

    from rlflow.workers.checkpointing import _dedupe_shared

    refs = [r for r in actor_group.call_all("publish_weights") if r is not None]
    state = ray.get(refs[0][0])
    base = resolve_model_path(model_cfg.path)

    def fill(folder: str) -> None:
        _copy_metadata(base, folder)
        save_file(_dedupe_shared(state), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})

    return atomic_folder(target, fill, replace=True)


def export_hf_model(checkpoint: str, target: str, role: str = "actor") -> str:
    weights = os.path.join(checkpoint, role, "model.safetensors")
    config_path = os.path.join(checkpoint, "config.yaml")
    if not os.path.isfile(weights) or not os.path.isfile(config_path):
        raise ConfigError(
            f"'{checkpoint}' is not an rlflow checkpoint (expected {role}/model.safetensors and "
            f"config.yaml): pass <output_dir>/checkpoints/global_step_N"
        )
    check_target(target)
    cfg = OmegaConf.load(config_path)
    base = resolve_model_path(cfg.model.path)

    def fill(folder: str) -> None:
        _copy_metadata(base, folder)
        shutil.copy2(weights, os.path.join(folder, "model.safetensors"))

    return atomic_folder(target, fill)  # onto a new or empty folder


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlflow.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="<output_dir>/checkpoints/global_step_N")
    parser.add_argument("target", help="folder to write the Hugging Face model to")
    parser.add_argument("--role", default="actor", help="which trained role to export (default: actor)")
    args = parser.parse_args(argv)
    try:
        path = export_hf_model(args.checkpoint, args.target, args.role)
    except (ConfigError, OSError) as exc:
        print(f"rlflow.export: error: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
