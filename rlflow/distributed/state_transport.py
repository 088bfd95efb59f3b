"""State dicts (and batches) through Ray without pickling tensors.

Ray pickles a torch tensor through ``torch.save``: one full copy into a byte string when it
is put and another when it is read. A numpy array travels as a raw buffer instead, copied
once into shared memory and read there in place. So each tensor goes as the flat array of
its bytes with its dtype and shape, and tensors that share memory (tied embeddings) go once
and come back shared. Tensors read back share the store's read-only memory: load them into
a model (``load_state_dict``, vLLM's ``load_weights``) or save them; never write to them.
``BatchedDataDict`` pickles its tensors the same way, into writable copies.
"""

from __future__ import annotations

import warnings
from typing import Any

import ray
import torch


def pack_state(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    tensors: dict[str, tuple] = {}
    aliases: dict[str, str] = {}
    first_name: dict[tuple, str] = {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu()
        shared = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if tensor.numel() and shared in first_name:
            aliases[name] = first_name[shared]
            continue
        first_name[shared] = name
        raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        tensors[name] = (raw, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))
    return {"names": list(state), "tensors": tensors, "aliases": aliases}


def unpack_state(packed: dict[str, Any], writable: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of ``pack_state``; ``writable``: in their own memory instead of the buffers'."""
    tensors = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, (raw, dtype, shape) in packed["tensors"].items():
            dtype = getattr(torch, dtype)
            if raw.size == 0:  # an empty buffer has no stride to reinterpret
                tensors[name] = torch.empty(shape, dtype=dtype)
            else:
                tensors[name] = torch.from_numpy(raw.copy() if writable else raw).view(dtype).reshape(shape)
    return {name: tensors[packed["aliases"].get(name, name)] for name in packed["names"]}


def put_state(state: dict[str, torch.Tensor]) -> ray.ObjectRef:
    """``state`` (name -> tensor) into the object store."""
    return ray.put(pack_state(state))


def get_state(ref: ray.ObjectRef) -> dict[str, torch.Tensor]:
    """The state dict ``put_state`` stored at ``ref``, read in place."""
    return unpack_state(ray.get(ref))
