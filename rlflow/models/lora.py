"""LoRA adapters on the policy (``actor.lora``), built with peft.

With LoRA on, the actor's model keeps its base weights frozen and trains low-rank adapters
``W + (alpha / rank) * B @ A`` on the target Linear layers. The adapters are injected into the
Hugging Face model in place (peft's ``inject_adapter_in_model``), so the model keeps its class,
its module names and its ``model.layers`` for FSDP2; parameter names gain ``.base_layer`` and
``.lora_A.default`` / ``.lora_B.default`` parts.

Three things follow from one frozen base:

* the reference policy is the same model with the adapters switched off
  (:func:`adapters_disabled`): no reference workers, no second copy of the weights;
* a weight sync ships only the adapters (:func:`adapter_state`), or, switched with
  ``actor.lora.sync=merged``, the merged full weights (:func:`merge_adapters`);
* a checkpoint holds the adapters (the trainable weights) and their optimiser state.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from rlflow.distributed.gather import gather_named
from rlflow.errors import ConfigError

ADAPTER_NAME = "default"
ALL_LINEAR = "all-linear"
LORA_SYNC_MODES = ("adapters", "merged")
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


def lora_enabled(lora_cfg: Any) -> bool:
    """LoRA is on when ``actor.lora.rank > 0`` or ``actor.lora.enable`` is true."""
    return lora_cfg is not None and (bool(lora_cfg.enable) or int(lora_cfg.rank) > 0)


def lora_scaling(lora_cfg: Any) -> float:
    return float(lora_cfg.alpha) / int(lora_cfg.rank)


def _target_entries(lora_cfg: Any) -> list[str]:
    targets = lora_cfg.target_modules
    return [ALL_LINEAR] if isinstance(targets, str) and targets == ALL_LINEAR else [str(t) for t in targets]


def resolve_target_modules(model: torch.nn.Module, lora_cfg: Any) -> list[str]:
    """Names of the Linear layers that get adapters (``q_proj``, ``down_proj`` ...).

    ``all-linear`` means every Linear layer but the output head, as in peft; a list names
    layers by their last name part (``q_proj`` adapts every layer's ``...self_attn.q_proj``)
    and may name the output head (``lm_head``).
    Raises ``ConfigError`` for a name that matches no module or a module that is not Linear.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear: set[str] = set()
    head_names: set[str] = set()
    other: dict[str, str] = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear):
            (head_names if module is head else linear).add(leaf)
        elif name:
            other.setdefault(leaf, type(module).__name__)
    entries = _target_entries(lora_cfg)
    if entries == [ALL_LINEAR]:
        return sorted(linear)
    linear |= head_names  # named explicitly, the output head can carry an adapter too
    available = ", ".join(sorted(linear))
    for entry in entries:
        if entry in linear:
            continue
        if entry in other:
            raise ConfigError(
                f"actor.lora.target_modules entry '{entry}' is {other[entry]}, not a Linear layer: "
                f"LoRA adapts the Linear layers {available} (or all-linear)"
            )
        raise ConfigError(
            f"actor.lora.target_modules entry '{entry}' matches no module of the model: "
            f"use names from {available}, or all-linear"
        )
    return sorted(set(entries))


def peft_lora_config(lora_cfg: Any, target_modules: list[str], base_path: str | None = None):
    from peft import LoraConfig

    return LoraConfig(
        r=int(lora_cfg.rank),
        lora_alpha=float(lora_cfg.alpha),
        lora_dropout=float(lora_cfg.dropout),
        target_modules=list(target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_path,
    )


def add_lora_adapters(model: torch.nn.Module, lora_cfg: Any) -> torch.nn.Module:
    """Inject LoRA adapters into ``model`` in place; only the adapters stay trainable.

    The adapters have the base weights' dtype (the whole model then trains in one dtype, as
    without LoRA, and FSDP2 gathers one dtype per layer); B starts at zero, so the adapted
    model starts equal to the base.
    """
    from peft import inject_adapter_in_model

    targets = resolve_target_modules(model, lora_cfg)
    model = inject_adapter_in_model(peft_lora_config(lora_cfg, targets), model, adapter_name=ADAPTER_NAME)
    dtype = next(p for n, p in model.named_parameters() if ".base_layer." in n).dtype
    for name, param in model.named_parameters():
        if is_adapter_key(name):
            param.data = param.data.to(dtype)
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing:
        # Checkpointed layers only backpropagate into inputs that require grad; with a frozen
        # embedding nothing would, and the adapters would get no gradient.
        model.enable_input_require_grads()
    return model


def _adapter_layers(model: torch.nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run ``model`` as its frozen base (the reference policy) inside the block."""
    layers = _adapter_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to disable: the reference policy needs actor.lora")
    # Only the flag each layer's forward reads. peft's enable_adapters() also flips the
    # adapters' requires_grad; doing that to FSDP2-sharded parameters between passes left the
    # live model and the weights its checkpoint gathers out of step (a resumed run diverged).
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield model
    finally:
        for layer in layers:
            layer._disable_adapters = False


def is_adapter_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights, unsharded on CPU, by parameter name (a collective under FSDP2).

    Only the adapters are gathered, never the base weights: this is all a LoRA sync ships.
    """
    return gather_named((name, p) for name, p in model.named_parameters() if is_adapter_key(name))


def lora_sync_state(model: torch.nn.Module, lora_cfg: Any, sync: str | None = None) -> dict[str, torch.Tensor]:
    """What one weight sync ships (a collective under FSDP2): the adapters (``sync`` or
    ``actor.lora.sync`` = ``adapters``), or the full weights with the adapters merged in
    (``merged``, for engines that cannot apply adapters themselves)."""
    if (sync or lora_cfg.sync) == "merged":
        return merge_adapters(gather_named(model.named_parameters()), lora_scaling(lora_cfg))
    return adapter_state(model)


def merge_adapters(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A LoRA model's full state dict -> the plain model's: ``W + scaling * B @ A`` under the
    layer's own name (``.base_layer`` and the adapter entries disappear)."""
    tag = f".{ADAPTER_NAME}.weight"
    merged: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if is_adapter_key(name):
            continue
        merged[name.replace(".base_layer.", ".")] = value
    for name, lora_a in state.items():
        if not name.endswith(".lora_A" + tag):
            continue
        layer = name[: -len(".lora_A" + tag)]
        lora_b = state[layer + ".lora_B" + tag]
        weight = merged[layer + ".weight"]
        delta = (lora_b.double() @ lora_a.double()) * scaling
        merged[layer + ".weight"] = (weight.double() + delta).to(weight.dtype)
    return merged


def peft_checkpoint_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter weights under the names peft saves and loads (``base_model.model.<name>``,
    without the adapter name), as in an ``adapter_model.safetensors``."""
    return {
        "base_model.model." + name.replace(f".{ADAPTER_NAME}.", "."): value.contiguous()
        for name, value in state.items()
        if is_adapter_key(name)
    }


def write_adapter_folder(folder: str, adapters: dict[str, torch.Tensor], lora_cfg: Any, base_path: str) -> str:
    """Write a peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)
    that ``PeftModel.from_pretrained(base, folder)`` and vLLM's LoRA loader read."""
    from safetensors.torch import save_file

    targets = sorted({name.split(".lora_")[0].rsplit(".", 1)[-1] for name in adapters if is_adapter_key(name)})
    os.makedirs(folder, exist_ok=True)
    peft_lora_config(lora_cfg, targets, base_path).save_pretrained(folder)
    save_file(peft_checkpoint_names(adapters), os.path.join(folder, ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    return folder


def check_lora_config(cfg: Any) -> None:
    """``actor.lora`` checks that run in the driver before any worker starts (``ConfigError``).

    The target modules are matched against the model's module names on a model built from its
    config on the meta device: no weights are read.
    """
    lcfg = cfg.actor.lora
    rank = int(lcfg.rank)
    if bool(lcfg.enable) and rank <= 0:
        raise ConfigError(f"actor.lora.rank={rank} must be > 0 when actor.lora.enable=true: use e.g. actor.lora.rank=8")
    if rank < 0:
        raise ConfigError(f"actor.lora.rank={rank} must be >= 0 (0 turns LoRA off): use e.g. actor.lora.rank=8")
    if not lora_enabled(lcfg):
        return
    if float(lcfg.alpha) <= 0:
        raise ConfigError(f"actor.lora.alpha={lcfg.alpha} must be > 0 (the adapters are scaled by alpha / rank)")
    if not 0.0 <= float(lcfg.dropout) < 1.0:
        raise ConfigError(f"actor.lora.dropout={lcfg.dropout} must be in [0, 1)")
    if lcfg.sync not in LORA_SYNC_MODES:
        raise ConfigError(f"actor.lora.sync='{lcfg.sync}' is not valid: use one of {', '.join(LORA_SYNC_MODES)}")
    targets = lcfg.target_modules
    if isinstance(targets, str) and targets != ALL_LINEAR or not isinstance(targets, str) and (
        not targets or not all(isinstance(t, str) and t for t in targets)
    ):
        raise ConfigError(
            f"actor.lora.target_modules={targets} is not valid: use all-linear or a list of module "
            "names such as [q_proj,v_proj]"
        )
    if cfg.trainer.algorithm == "rl" and cfg.rollout.weight_sync == "nccl":
        raise ConfigError(
            "actor.lora does not work with rollout.weight_sync=nccl (it broadcasts a plain model's "
            "full weights): use rollout.weight_sync=object_store"
        )
    model = meta_model(cfg.model)
    targets = resolve_target_modules(model, lcfg)
    if lcfg.sync == "merged" and "lm_head" in targets and getattr(model.config, "tie_word_embeddings", False):
        raise ConfigError(
            "actor.lora.sync=merged cannot ship an adapted lm_head of a model with tied input and output "
            "embeddings (the rollout model has one matrix for both): use actor.lora.sync=adapters"
        )


def meta_model(model_cfg: Any) -> torch.nn.Module:
    """The model of ``model.path`` built from its config on the meta device (no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlflow.models.loading import resolve_model_path

    path = resolve_model_path(model_cfg.path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
