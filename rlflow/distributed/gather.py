"""Unsharded CPU copies of FSDP2-sharded tensors, for weight syncs, checkpoints and LoRA
adapters: one collective per bucket of parameters instead of one per parameter."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist


# Bytes one gathering collective brings in: bounds the transient memory of a weight sync.
_GATHER_BUCKET_BYTES = 256 * 2**20


def _row_sharded(v: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor, Shard

    return isinstance(v, DTensor) and v.device_mesh.ndim == 1 and tuple(v.placements) == (Shard(0),)


def _gather_rows(bucket: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """One ``all_gather`` for row-sharded DTensors of one dtype and mesh: rank r holds rows
    ``[r*c, (r+1)*c)`` of each (``c = ceil(rows / world)``, as FSDP2 shards), sent padded to
    ``c`` rows in one flat buffer."""
    group = bucket[0].device_mesh.get_group()
    world = dist.get_world_size(group)
    pieces, sizes = [], []
    for v in bucket:
        size = -(-v.shape[0] // world) * (v.numel() // max(v.shape[0], 1))
        local = v.to_local().detach().reshape(-1)
        pieces.append(torch.nn.functional.pad(local, (0, size - local.numel())))
        sizes.append(size)
    buffer = torch.cat(pieces)
    gathered = [torch.empty_like(buffer) for _ in range(world)]
    dist.all_gather(gathered, buffer, group=group)
    gathered = [g.cpu() for g in gathered]
    out, offset = {}, 0
    for v, size in zip(bucket, sizes):
        rows = torch.cat([g[offset : offset + size].view(-1, *v.shape[1:]) for g in gathered])
        # cat made a new tensor; only a padded tail needs copying off into its own storage
        out[id(v)] = rows if rows.shape[0] == v.shape[0] else rows[: v.shape[0]].clone()
        offset += size
    return out


def gather_full(values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Unsharded CPU copies of ``values`` (a collective when sharded: every rank must call it
    with the same list). FSDP2's row-sharded parameters are gathered in buckets, one
    collective per bucket instead of one per parameter (a CPU weight sync's main cost);
    anything else with ``full_tensor``. A tensor listed twice (tied weights) is gathered once
    and both places get the same copy."""
    unique = list({id(v): v for v in values}.values())
    out: dict[int, torch.Tensor] = {}
    bucket: list[torch.Tensor] = []
    for v in filter(_row_sharded, unique):
        if bucket:
            first = bucket[0]
            size = sum(t.numel() for t in bucket + [v]) * v.element_size() * first.device_mesh.size()
            if v.dtype != first.dtype or v.device_mesh is not first.device_mesh or size > _GATHER_BUCKET_BYTES:
                out.update(_gather_rows(bucket))
                bucket = []
        bucket.append(v)
    if bucket:
        out.update(_gather_rows(bucket))
    for v in unique:
        if id(v) not in out:
            out[id(v)] = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().clone()
    return [out[id(v)] for v in values]


def gather_named(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``gather_full`` by name: ``{name: unsharded CPU copy}`` (a collective when sharded)."""
    pairs = list(named)
    return dict(zip([name for name, _ in pairs], gather_full([value for _, value in pairs])))
