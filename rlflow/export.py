"""Export a checkpoint's policy weights as a Hugging Face model folder.

    python -m rlflow.export <output_dir>/checkpoints/global_step_N <target_dir> [--merged DIR]

The folder gets the base model's config, generation config and tokenizer files plus the
trained ``model.safetensors``, so ``AutoModelForCausalLM.from_pretrained(target_dir)`` loads it.
A LoRA run (``actor.lora``) exports its adapter folder instead, which
``PeftModel.from_pretrained(base, target_dir)`` loads; ``--merged DIR`` also writes the base
with the adapters merged in as a full Hugging Face model folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Any, Optional, Sequence

import torch
from omegaconf import OmegaConf

from rlflow.errors import ConfigError
from rlflow.models.loading import resolve_model_path
from rlflow.models.lora import lora_enabled, write_adapter_folder
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


def export_merged_lora(adapter_folder: str, model_cfg: Any, target: str, replace: bool = False) -> str:
    """The base model with the adapters of ``adapter_folder`` merged in, as an HF model folder."""
    from peft import PeftModel

    from rlflow.models.loading import load_causal_lm

    base = resolve_model_path(model_cfg.path)
    model = load_causal_lm(model_cfg)
    if getattr(model.config, "tie_word_embeddings", False):
        # An adapted lm_head no longer equals the input embedding: give it its own matrix.
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model = PeftModel.from_pretrained(model, adapter_folder).merge_and_unload()

    def fill(folder: str) -> None:
        model.save_pretrained(folder)
        _copy_metadata(base, folder)

    return atomic_folder(target, fill, replace=replace)


def export_lora_from_state(
    adapters: dict, cfg: Any, target: str, merged_target: Optional[str], replace: bool = False
) -> str:
    """Write the adapter folder (and, with ``merged_target``, the merged model)."""
    base = resolve_model_path(cfg.model.path)
    atomic_folder(target, lambda folder: write_adapter_folder(folder, adapters, cfg.actor.lora, base), replace=replace)
    if merged_target is not None:
        export_merged_lora(target, cfg.model, merged_target, replace=replace)
    return target


def export_from_actor_group(actor_group, cfg: Any, target: str) -> str:
    """Write the live policy of a running trainer (its actor WorkerGroup) as an HF folder.

    With LoRA: the adapter folder goes to ``<target's parent>/lora_adapter`` and the merged
    model to ``target``."""
    from safetensors.torch import save_file

    from rlflow.distributed.state_transport import get_state
    from rlflow.workers.checkpointing import _dedupe_shared

    model_cfg = cfg.model
    if lora_enabled(cfg.actor.lora):
        refs = [r for r in actor_group.call_all("publish_weights", lora_sync="adapters") if r is not None]
        adapter_dir = os.path.join(os.path.dirname(os.path.abspath(target)), "lora_adapter")
        export_lora_from_state(get_state(refs[0][0]), cfg, adapter_dir, target, replace=True)
        return target
    refs = [r for r in actor_group.call_all("publish_weights") if r is not None]
    state = get_state(refs[0][0])
    base = resolve_model_path(model_cfg.path)

    def fill(folder: str) -> None:
        _copy_metadata(base, folder)
        save_file(_dedupe_shared(state), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})

    return atomic_folder(target, fill, replace=True)


def export_hf_model(checkpoint: str, target: str, role: str = "actor", merged_target: Optional[str] = None) -> str:
    weights = os.path.join(checkpoint, role, "model.safetensors")
    config_path = os.path.join(checkpoint, "config.yaml")
    if not os.path.isfile(weights) or not os.path.isfile(config_path):
        raise ConfigError(
            f"'{checkpoint}' is not an rlflow checkpoint (expected {role}/model.safetensors and "
            f"config.yaml): pass <output_dir>/checkpoints/global_step_N"
        )
    check_target(target)
    cfg = OmegaConf.load(config_path)
    if role == "actor" and lora_enabled(cfg.actor.get("lora")):
        from safetensors.torch import load_file

        if merged_target is not None:
            check_target(merged_target)
        return export_lora_from_state(load_file(weights), cfg, target, merged_target)
    if merged_target is not None:
        raise ConfigError(f"--merged applies to LoRA runs (actor.lora), and '{checkpoint}' holds full weights")
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
    parser.add_argument(
        "--merged", metavar="DIR", default=None,
        help="LoRA runs: also write the base model with the adapters merged in to DIR",
    )
    args = parser.parse_args(argv)
    try:
        path = export_hf_model(args.checkpoint, args.target, args.role, args.merged)
    except (ConfigError, OSError) as exc:
        print(f"rlflow.export: error: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
