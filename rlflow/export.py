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
import tempfile
from typing import Optional, Sequence

from omegaconf import OmegaConf

from rlflow.errors import ConfigError
from rlflow.models.loading import resolve_model_path

# Files of an HF model folder that describe the model but hold no weights.
METADATA_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")


def _copy_metadata(base: str, folder: str) -> None:
    for name in os.listdir(base):
        if name.endswith(METADATA_SUFFIXES) and not name.endswith(".index.json"):
            shutil.copy2(os.path.join(base, name), os.path.join(folder, name))


def _atomic_folder(target: str, fill) -> str:
    parent = os.path.dirname(os.path.abspath(target)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        fill(tmp)
        if os.path.exists(target):
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


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

    return _atomic_folder(target, fill)


def export_hf_model(checkpoint: str, target: str, role: str = "actor") -> str:
    weights = os.path.join(checkpoint, role, "model.safetensors")
    config_path = os.path.join(checkpoint, "config.yaml")
    if not os.path.isfile(weights) or not os.path.isfile(config_path):
        raise ConfigError(
            f"'{checkpoint}' is not an rlflow checkpoint (expected {role}/model.safetensors and "
            f"config.yaml): pass <output_dir>/checkpoints/global_step_N"
        )
    cfg = OmegaConf.load(config_path)
    base = resolve_model_path(cfg.model.path)

    def fill(folder: str) -> None:
        _copy_metadata(base, folder)
        shutil.copy2(weights, os.path.join(folder, "model.safetensors"))

    return _atomic_folder(target, fill)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlflow.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="<output_dir>/checkpoints/global_step_N")
    parser.add_argument("target", help="folder to write the Hugging Face model to")
    parser.add_argument("--role", default="actor", help="which trained role to export (default: actor)")
    args = parser.parse_args(argv)
    try:
        path = export_hf_model(args.checkpoint, args.target, args.role)
    except (ConfigError, OSError) as exc:
        print(f"rlflow.export: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
