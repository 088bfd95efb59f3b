"""Save and restore a trainable worker's state inside a checkpoint folder.

Weights are gathered to full tensors and written by rank 0 as ``model.safetensors`` (so a
checkpoint's weights are also a loadable HF state dict). A model with frozen parameters (LoRA:
a frozen base with trainable adapters) stores only its trainable weights: the frozen ones are
those of ``model.path``, unchanged. The optimiser state is gathered the
same way (``optimizer.pt``, plain tensors, read back with ``weights_only=True``) and broadcast
from rank 0 on load, so a run can resume on the same number of workers. Every rank writes its
own RNG state. Works for FSDP2-sharded and plain modules.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from rlflow.distributed.gather import gather_named
from rlflow.trainer.checkpoint import load_rng, save_rng


def _is_sharded(model: torch.nn.Module) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU weights (a collective when sharded: every rank must call it); tied weights
    stay one tensor under both names."""
    return gather_named(model.state_dict(keep_vars=True).items())


def _frozen_part(model: torch.nn.Module) -> bool:
    return any(not p.requires_grad for p in model.parameters())


def checkpoint_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint stores: all weights, or only the trainable ones when part of the model
    is frozen (a collective when sharded: every rank must call it)."""
    if not _frozen_part(model):
        return full_model_state(model)
    return gather_named((name, param) for name, param in model.named_parameters() if param.requires_grad)


def _dedupe_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share memory (tied embeddings); keep the first name.
    seen: dict[int, str] = {}
    out = {}
    for key, value in state.items():
        ptr = value.data_ptr()
        if ptr in seen and value.numel() > 0:
            continue
        seen[ptr] = key
        out[key] = value.contiguous()
    return out


def save_worker_state(
    folder: str,
    rank: int,
    model: torch.nn.Module,
    optimizer: Optional[torch.optim.Optimizer],
    lr_scheduler: Optional[Any],
    extra: dict[str, Any],
) -> None:
    """All ranks call this; rank 0 writes the shared files, each rank its RNG state."""
    os.makedirs(folder, exist_ok=True)
    weights = checkpoint_weights(model)
    optim_state = None
    if optimizer is not None:
        if _is_sharded(model):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            optim_state = get_optimizer_state_dict(
                model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        else:
            optim_state = optimizer.state_dict()
    if rank == 0:
        save_file(_dedupe_shared(weights), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        if optim_state is not None:
            torch.save(optim_state, os.path.join(folder, "optimizer.pt"))
        if lr_scheduler is not None:
            torch.save(lr_scheduler.state_dict(), os.path.join(folder, "lr_scheduler.pt"))
        with open(os.path.join(folder, "worker_state.json"), "w", encoding="utf-8") as f:
            json.dump(extra, f)
    save_rng(os.path.join(folder, f"rng_rank{rank}.pt"))
    if _is_sharded(model):
        dist.barrier()


def load_worker_state(
    folder: str,
    rank: int,
    model: torch.nn.Module,
    optimizer: Optional[torch.optim.Optimizer],
    lr_scheduler: Optional[Any],
) -> dict[str, Any]:
    """Restore what ``save_worker_state`` wrote; returns the ``extra`` dict."""
    weights = load_file(os.path.join(folder, "model.safetensors"))
    sharded = _is_sharded(model)
    if sharded:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, weights, options=options)
    else:
        model.load_state_dict(weights, strict=False)
    _check_loaded(model, weights)
    if optimizer is not None and os.path.isfile(os.path.join(folder, "optimizer.pt")):
        optim_state = torch.load(os.path.join(folder, "optimizer.pt"), weights_only=True)
        if sharded:
            set_optimizer_state_dict(
                model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True)
            )
        else:
            optimizer.load_state_dict(optim_state)
    if lr_scheduler is not None and os.path.isfile(os.path.join(folder, "lr_scheduler.pt")):
        lr_scheduler.load_state_dict(torch.load(os.path.join(folder, "lr_scheduler.pt"), weights_only=True))
    rng_path = os.path.join(folder, f"rng_rank{rank}.pt")
    if os.path.isfile(rng_path):
        load_rng(rng_path)
    with open(os.path.join(folder, "worker_state.json"), encoding="utf-8") as f:
        return json.load(f)


def _check_loaded(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    if _frozen_part(model):
        expected = {name for name, p in model.named_parameters() if p.requires_grad}
    else:
        expected = set(model.state_dict().keys())
    missing = [k for k in expected if k not in weights and not k.endswith("lm_head.weight")]
    if missing:
        raise RuntimeError(f"checkpoint weights lack {len(missing)} parameters, e.g. {missing[:3]}")
