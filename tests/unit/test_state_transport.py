"""State dicts through the object store as raw buffers: every dtype and shape comes back exactly,
tied tensors travel once and come back tied, and a Ray worker reads what the driver put."""

from __future__ import annotations

import pytest
import torch

from rlflow.distributed.state_transport import get_state, pack_state, put_state, unpack_state


def _state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    embed = torch.randn(7, 3, generator=gen)
    grid = torch.randn(4, 5, generator=gen)
    return {
        "embed.weight": embed,
        "bf16": torch.randn(2, 3, generator=gen).to(torch.bfloat16),
        "fp16": torch.randn(5, generator=gen).to(torch.float16),
        "ids": torch.arange(-3, 9, dtype=torch.int64).reshape(3, 4),
        "flags": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "transposed": grid.t(),  # not contiguous
        "row_of_embed": embed[2],  # shares memory with embed but is a different tensor
        "lm_head.weight": embed,  # tied to embed
        "trained": torch.nn.Parameter(torch.ones(2, 2)),  # requires grad
    }


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor.detach()), name


def test_round_trip_keeps_values_dtypes_shapes_and_order():
    state = _state()
    _assert_same(unpack_state(pack_state(state)), state)


def test_tied_tensors_travel_once_and_come_back_tied():
    packed = pack_state(_state())
    assert packed["aliases"] == {"lm_head.weight": "embed.weight"}
    assert "row_of_embed" in packed["tensors"]  # same memory, other shape: its own entry
    back = unpack_state(packed)
    assert back["lm_head.weight"].data_ptr() == back["embed.weight"].data_ptr()
    assert back["row_of_embed"].data_ptr() != back["embed.weight"].data_ptr()


def test_payload_holds_numpy_buffers_not_tensors():
    # Ray moves numpy buffers without a copy through torch.save; tensors would take that path.
    import numpy as np

    for raw, _, _ in pack_state(_state())["tensors"].values():
        assert isinstance(raw, np.ndarray) and raw.dtype == np.uint8


@pytest.mark.ray
def test_a_ray_worker_reads_the_state_the_driver_put(ray_cluster):
    import ray

    state = _state()

    @ray.remote
    def read(refs: list) -> dict:
        return {name: tensor.clone() for name, tensor in get_state(refs[0]).items()}

    _assert_same(ray.get(read.remote([put_state(state)])), state)
    _assert_same(get_state(put_state(state)), state)
