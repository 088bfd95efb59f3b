"""Data-parallel training pieces shared by the FSDP2 workers (policy, DPO policy, critic).

* :func:`shard_decoder_layers` wraps each decoder block (found by :func:`decoder_blocks`),
  then the root, with FSDP2's ``fully_shard``: parameters are all-gathered one block at a
  time in forward and backward.
* :func:`global_token_and_seq_counts` sums a mini-batch's token and sequence counts over
  ranks, the denominators of the globally normalised losses.
* :func:`clip_and_step` clips the gradient norm and takes the optimiser step, skipping it
  when the norm is not finite.
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from rlflow.algorithms.losses import count_tokens_and_seqs

ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks of ``model``, found the way transformers declares them.

    Every transformers model class lists the module classes that must stay whole when the
    model is split (``_no_split_modules``: ``LlamaDecoderLayer``, ``GPT2Block`` ...); those
    are its repeated blocks wherever they sit (``model.layers``, ``transformer.h``,
    ``model.decoder.layers``). Blocks nested inside another block are left to the outer one.
    """
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    blocks: list[torch.nn.Module] = []
    taken: list[str] = []
    for path, module in model.named_modules():
        if type(module).__name__ in names and not any(path.startswith(p + ".") for p in taken):
            blocks.append(module)
            taken.append(path)
    return blocks


def shard_decoder_layers(model: ModuleT, setting: str) -> ModuleT:
    """``fully_shard`` every decoder block of ``model`` (:func:`decoder_blocks`), then
    ``model``; returns ``model``.

    Raises ValueError when the model declares no blocks, naming ``setting`` (the config key
    that avoids sharding, e.g. ``actor.num_workers=1``). Needs an initialised process group.
    """
    from torch.distributed.fsdp import fully_shard

    blocks = decoder_blocks(model)
    if not blocks:
        raise ValueError(
            f"cannot shard {type(model).__name__} with FSDP2: its transformers class declares "
            f"no decoder blocks (_no_split_modules); set {setting}"
        )
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def global_token_and_seq_counts(response_mask: torch.Tensor, world_size: int) -> tuple[float, float]:
    """Valid tokens and sequences of ``response_mask`` ``(B, T)`` summed over all ranks.

    A collective when ``world_size > 1``: every rank must call it.
    """
    num_tokens, num_seqs = count_tokens_and_seqs(response_mask)
    counts = torch.tensor([float(num_tokens), float(num_seqs)], dtype=torch.float64)
    if world_size > 1:
        dist.all_reduce(counts)
    return counts[0].item(), counts[1].item()


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the gradients of ``model`` to total norm ``max_norm`` and return the norm before
    clipping; ``max_norm <= 0`` only measures. Parameters without a gradient are left out.

    With FSDP2 the gradients are sharded DTensors and the norm comes back as one; it is made
    whole (the norm over all ranks), so every rank returns the same value.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def clip_and_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler: Any, max_norm: float
) -> tuple[float, bool]:
    """Finish one optimiser step on the accumulated gradients; returns ``(grad_norm, skipped)``.

    Clips as :func:`clip_grad_norm`. A non-finite norm (inf/nan in some gradient) skips the
    update and drops the gradients, since stepping would corrupt the weights; the LR
    scheduler advances either way, so the schedule stays tied to the step count.
    """
    grad_norm = clip_grad_norm(model, max_norm)
    skipped = not math.isfinite(grad_norm)
    if skipped:
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()
    lr_scheduler.step()
    return grad_norm, skipped
