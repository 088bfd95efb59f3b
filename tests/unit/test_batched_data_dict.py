"""Tests for rlflow.data.batched_data_dict.BatchedDataDict."""

from __future__ import annotations

import pickle

import pytest
import torch

from rlflow.data.batched_data_dict import (
    BatchedDataDict,
    SlicedDataDict,
    _pack_best_fit_decreasing,
    _pack_concatenative,
    _pack_first_fit_decreasing,
    _pack_modified_first_fit_decreasing,
)


def _batch(n: int = 8) -> BatchedDataDict:
    return BatchedDataDict(
        {
            "x": torch.arange(n),
            "ids": torch.arange(n * 3).reshape(n, 3),
            "text": [f"s{i}" for i in range(n)],
        }
    )


def _rows(bdd: BatchedDataDict) -> list[int]:
    return bdd["x"].tolist()


def _global_batch(shard: BatchedDataDict, g: int) -> BatchedDataDict:
    """Global batch ``g`` of a shard made by ``shard_by_batch_size``."""
    start = sum(shard.elem_counts_per_gb[:g])
    return shard.slice(start, start + shard.elem_counts_per_gb[g])


def _micro_batches(shard: BatchedDataDict, g: int) -> list[BatchedDataDict]:
    """The planned micro-batches (or packing bins) of global batch ``g`` of a shard."""
    gb = _global_batch(shard, g)
    return [gb.slice(a, b) for a, b in shard.micro_batch_indices[g]]


# ----------------------------------------------------------------------------- from_batches


def test_from_batches_concatenates_and_right_pads_dim1():
    a = {"v": torch.tensor([1, 2]), "seq": torch.tensor([[1, 2], [3, 4]]), "s": ["a", "b"]}
    b = {"v": torch.tensor([3]), "seq": torch.tensor([[5, 6, 7]]), "s": ["c"]}
    out = BatchedDataDict.from_batches([a, b])
    assert isinstance(out, BatchedDataDict)
    assert out["v"].tolist() == [1, 2, 3]
    assert out["seq"].tolist() == [[1, 2, 0], [3, 4, 0], [5, 6, 7]]
    assert out["s"] == ["a", "b", "c"]
    assert out.size == 3


def test_from_batches_uses_pad_value_per_key_and_pads_3d_along_dim1():
    a = {"seq": torch.ones(1, 1, dtype=torch.long), "feat": torch.ones(1, 1, 2)}
    b = {"seq": torch.ones(1, 3, dtype=torch.long), "feat": torch.full((2, 2, 2), 2.0)}
    out = BatchedDataDict.from_batches([a, b], pad_value_dict={"seq": -7, "feat": -1.0})
    assert out["seq"].tolist() == [[1, -7, -7], [1, 1, 1]]
    assert out["feat"].shape == (3, 2, 2)
    expected_row0 = [[1.0, 1.0], [-1.0, -1.0]]
    assert out["feat"][0].tolist() == expected_row0
    assert torch.equal(out["feat"][1:], torch.full((2, 2, 2), 2.0))


def test_from_batches_bool_tensors_pad_with_false():
    out = BatchedDataDict.from_batches(
        [{"m": torch.tensor([[True]])}, {"m": torch.tensor([[True, True]])}]
    )
    assert out["m"].tolist() == [[True, False], [True, True]]


def test_from_batches_errors():
    with pytest.raises(ValueError, match="empty"):
        BatchedDataDict.from_batches([])
    with pytest.raises(ValueError, match=r"batches\[1\].*missing \['b'\]"):
        BatchedDataDict.from_batches([{"a": [1], "b": [2]}, {"a": [3]}])
    with pytest.raises(TypeError, match="'a' mixes"):
        BatchedDataDict.from_batches([{"a": [1]}, {"a": torch.tensor([1])}])
    with pytest.raises(ValueError, match="different ranks"):
        BatchedDataDict.from_batches([{"a": torch.zeros(1)}, {"a": torch.zeros(1, 2)}])
    with pytest.raises(ValueError, match="after dim 1"):
        BatchedDataDict.from_batches([{"a": torch.zeros(1, 2, 3)}, {"a": torch.zeros(1, 2, 4)}])
    with pytest.raises(TypeError, match="0-d"):
        BatchedDataDict.from_batches([{"a": torch.tensor(1.0)}])


# ----------------------------------------------------------------------------- size / basics


def test_size_and_errors():
    assert _batch(5).size == 5
    assert BatchedDataDict().size == 0
    bad = BatchedDataDict({"a": torch.zeros(4), "b": [1, 2, 3]})
    with pytest.raises(ValueError, match="a=4, b=3"):
        _ = bad.size
    with pytest.raises(TypeError, match="'c'"):
        _ = BatchedDataDict({"c": "not a list"}).size


def test_to_and_pickle_round_trip():
    b = _batch(4)
    assert b.to("cpu") is b
    shards, _ = b.shard_by_batch_size(
        2,
        dynamic_batching_args={
            "max_tokens_per_microbatch": 6,
            "input_key": "ids",
            "input_lengths_key": "x",
        },
    )
    restored = pickle.loads(pickle.dumps(shards[1]))
    assert isinstance(restored, SlicedDataDict)
    assert torch.equal(restored["ids"], shards[1]["ids"]) and restored["text"] == shards[1]["text"]
    assert restored.micro_batch_indices == shards[1].micro_batch_indices
    assert restored.micro_batch_lengths == shards[1].micro_batch_lengths
    assert restored.elem_counts_per_gb == shards[1].elem_counts_per_gb
    assert restored.sequence_key == "ids"


def test_pickled_batch_keeps_values_and_aliases_in_writable_tensors():
    b = _batch(4)
    b["f16"] = torch.tensor([0.5, 1.5, -2.0, 3.0], dtype=torch.float16)
    b["bf16"] = torch.linspace(-1, 1, 8).reshape(4, 2).to(torch.bfloat16)
    b["same_ids"] = b["ids"]
    restored = pickle.loads(pickle.dumps(b, protocol=5))
    assert type(restored) is BatchedDataDict and list(restored) == list(b)
    for key in ("x", "ids", "f16", "bf16"):
        assert restored[key].dtype == b[key].dtype and torch.equal(restored[key], b[key])
    assert restored["text"] == b["text"]
    assert restored["same_ids"] is restored["ids"]  # one tensor under two keys stays one
    restored["ids"][0, 0] = -7  # received batches may be changed in place
    assert restored["same_ids"][0, 0] == -7 and b["ids"][0, 0] == 0


def test_a_pickled_slice_carries_only_its_rows():
    big = BatchedDataDict({"x": torch.zeros(4096, 64)})
    whole, rows = len(pickle.dumps(big)), len(pickle.dumps(big.slice(0, 8)))
    assert rows * 100 < whole, (rows, whole)


# ----------------------------------------------------------------------------- row selection


def test_slice_and_select_indices():
    b = _batch(6)
    s = b.slice(1, 4)
    assert isinstance(s, SlicedDataDict)
    assert _rows(s) == [1, 2, 3] and s["text"] == ["s1", "s2", "s3"]
    assert s["ids"].tolist() == [[3, 4, 5], [6, 7, 8], [9, 10, 11]]
    with pytest.raises(ValueError, match="out of range"):
        b.slice(2, 7)
    picked = b.select_indices([5, 0, 5])
    assert _rows(picked) == [5, 0, 5] and picked["text"] == ["s5", "s0", "s5"]
    assert picked["ids"][0].tolist() == [15, 16, 17]
    assert _rows(b.select_indices(torch.tensor([2, 1]))) == [2, 1]
    with pytest.raises(ValueError, match="out of range"):
        b.select_indices([6])
    with pytest.raises(TypeError, match="indices"):
        b.select_indices(torch.tensor([0.0]))


def test_chunk():
    b = _batch(6)
    assert _rows(b.chunk(0, 3)) == [0, 1]
    assert _rows(b.chunk(2, 3)) == [4, 5]
    assert b.chunk(1, 3)["text"] == ["s2", "s3"]
    with pytest.raises(ValueError, match="not divisible by chunks=4"):
        b.chunk(0, 4)
    with pytest.raises(ValueError, match="rank"):
        b.chunk(3, 3)


def test_repeat_interleave_repeats_each_sample_consecutively():
    b = BatchedDataDict({"t": torch.tensor([[1, 2], [3, 4]]), "meta": [{"k": 1}, {"k": 2}]})
    r = b.repeat_interleave(3)
    assert r["t"].tolist() == [[1, 2]] * 3 + [[3, 4]] * 3
    assert r["meta"] == [{"k": 1}] * 3 + [{"k": 2}] * 3
    r["meta"][0]["k"] = 99  # copies are independent of each other and of the source
    assert r["meta"][1]["k"] == 1 and b["meta"][0]["k"] == 1
    with pytest.raises(ValueError, match="num_repeats"):
        b.repeat_interleave(0)


def test_make_microbatch_iterator():
    b = _batch(6)
    assert [_rows(mb) for mb in b.make_microbatch_iterator(2)] == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="microbatch_size=4"):
        list(b.make_microbatch_iterator(4))


def test_reorder_data_inverts_a_permutation():
    b = _batch(4)
    permuted = b.select_indices([2, 0, 3, 1])
    permuted.reorder_data([2, 0, 3, 1])
    assert _rows(permuted) == [0, 1, 2, 3] and permuted["text"] == ["s0", "s1", "s2", "s3"]
    with pytest.raises(ValueError, match="permutation"):
        b.reorder_data([0, 0, 1, 2])


# ----------------------------------------------------------------------------- plain sharding


def test_shard_by_batch_size_spreads_each_global_batch_over_shards():
    shards = _batch(8).shard_by_batch_size(shards=2, batch_size=4)
    assert [_rows(s) for s in shards] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert shards[1]["text"] == ["s2", "s3", "s6", "s7"]
    assert all(isinstance(s, SlicedDataDict) for s in shards)
    assert shards[0].elem_counts_per_gb == [2, 2]
    assert _rows(_global_batch(shards[0], 1)) == [4, 5]
    one_per_gb = _batch(6).shard_by_batch_size(2, batch_size=2)[1]
    assert _rows(one_per_gb) == [1, 3, 5] and one_per_gb.elem_counts_per_gb == [1, 1, 1]


def test_shard_without_batch_size_and_uneven():
    assert [_rows(s) for s in _batch(8).shard_by_batch_size(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    uneven = _batch(5).shard_by_batch_size(2, allow_uneven_shards=True)
    assert [_rows(s) for s in uneven] == [[0, 1, 2], [3, 4]]
    tiny = _batch(2).shard_by_batch_size(3, allow_uneven_shards=True)
    assert [_rows(s) for s in tiny] == [[0], [1], []]


def test_shard_errors():
    b = _batch(8)
    with pytest.raises(ValueError, match="not divisible by batch_size=3"):
        b.shard_by_batch_size(1, batch_size=3)
    with pytest.raises(ValueError, match="batch_size 4 is not divisible by shards=3"):
        b.shard_by_batch_size(3, batch_size=4)
    with pytest.raises(ValueError, match="batch_size must be None"):
        b.shard_by_batch_size(2, batch_size=4, allow_uneven_shards=True)
    both = {"max_tokens_per_microbatch": 8, "input_key": "ids", "input_lengths_key": "x"}
    with pytest.raises(ValueError, match="not both"):
        b.shard_by_batch_size(2, dynamic_batching_args=both, sequence_packing_args=both)
    with pytest.raises(ValueError, match="micro_batch_order"):
        b.shard_by_batch_size(2, dynamic_batching_args={**both, "micro_batch_order": "random"})
    with pytest.raises(ValueError, match="algorithm"):
        b.shard_by_batch_size(2, sequence_packing_args={**both, "algorithm": "magic"})
    with pytest.raises(ValueError, match="unknown keys \\['max_tokens'\\]"):
        b.shard_by_batch_size(2, dynamic_batching_args={**both, "max_tokens": 3})
    with pytest.raises(ValueError, match="missing required keys \\['input_key'\\]"):
        b.shard_by_batch_size(
            2, sequence_packing_args={"max_tokens_per_microbatch": 8, "input_lengths_key": "x"}
        )
    lengths = BatchedDataDict({"ids": torch.zeros(2, 9), "n": [9, 2]})
    args = {"max_tokens_per_microbatch": 8, "input_key": "ids", "input_lengths_key": "n"}
    with pytest.raises(ValueError, match="max_tokens_per_microbatch"):
        lengths.shard_by_batch_size(1, dynamic_batching_args=args)
    with pytest.raises(ValueError, match="max_tokens_per_microbatch"):
        lengths.shard_by_batch_size(1, sequence_packing_args=args)
    with pytest.raises(ValueError, match="outside"):
        BatchedDataDict({"ids": torch.zeros(1, 3), "n": [4]}).shard_by_batch_size(
            1, dynamic_batching_args=args
        )


# ----------------------------------------------------------------------------- dynamic batching


def _seq_batch(n: int, width: int, seed: int) -> BatchedDataDict:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (n,), generator=gen)
    ids = torch.arange(n * width).reshape(n, width)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return BatchedDataDict(
        {"input_ids": ids, "attention_mask": mask, "len": lengths, "uid": list(range(n))}
    )


@pytest.mark.parametrize(
    "n, gbs, shards, cap, rnd, order",
    [
        (16, 8, 2, 64, 8, "ascending"),
        (24, 12, 3, 40, 4, "descending"),
        (8, None, 4, 30, 1, "ascending"),
        (12, 6, 1, 33, 5, "ascending"),
    ],
)
def test_dynamic_batching_invariants(n, gbs, shards, cap, rnd, order):
    width = 20
    batch = _seq_batch(n, width, seed=n + shards)
    lengths = batch["len"].tolist()
    args = {
        "max_tokens_per_microbatch": cap,
        "input_key": "input_ids",
        "input_lengths_key": "len",
        "sequence_length_round": rnd,
        "micro_batch_order": order,
    }
    parts, order_idx = batch.shard_by_batch_size(shards, batch_size=gbs, dynamic_batching_args=args)
    gbs = gbs or n
    assert sorted(order_idx) == list(range(n))
    assert order_idx == [u for p in parts for u in p["uid"]]
    num_gb = n // gbs
    for g in range(num_gb):
        counts = {len(p.micro_batch_indices[g]) for p in parts}
        assert len(counts) == 1, "every shard must run the same number of micro-batches"
        members = set()
        for p in parts:
            gb = _global_batch(p, g)
            assert all(g * gbs <= u < (g + 1) * gbs for u in gb["uid"]), (
                "samples stay in their global batch"
            )
            members.update(gb["uid"])
            mbs = _micro_batches(p, g)
            for mb, length in zip(mbs, p.micro_batch_lengths[g], strict=True):
                assert length % rnd == 0
                assert mb.size * length <= cap
                assert max(lengths[u] for u in mb["uid"]) <= length
            seen = [u for mb in mbs for u in mb["uid"]]
            assert seen == gb["uid"], (
                "micro-batches cover the shard's global batch exactly once, in order"
            )
        assert members == set(range(g * gbs, (g + 1) * gbs))
    gathered = BatchedDataDict.from_batches(parts).reorder_data(order_idx)
    assert gathered["uid"] == list(range(n))
    assert torch.equal(gathered["input_ids"], batch["input_ids"])


def test_dynamic_batching_balances_lengths_and_plans_rounded_lengths():
    # widths 10, round 8: a length-9 sample needs a 16-wide micro-batch
    batch = BatchedDataDict(
        {"input_ids": torch.ones(4, 10, dtype=torch.long), "len": [9, 1, 2, 8], "uid": [0, 1, 2, 3]}
    )
    args = {
        "max_tokens_per_microbatch": 16,
        "input_key": "input_ids",
        "input_lengths_key": "len",
        "sequence_length_round": 8,
    }
    parts, order_idx = batch.shard_by_batch_size(2, dynamic_batching_args=args)
    # sorted by length: 1(u1) 2(u2) 8(u3) 9(u0), dealt round robin
    assert [p["uid"] for p in parts] == [[1, 3], [2, 0]]
    assert order_idx == [1, 3, 2, 0]
    # shard 1 cannot fit 2 x 16 > 16 tokens, so it runs [8], [16]; shard 0 would fit both
    # samples in one 2 x 8 micro-batch but is split to match shard 1's two steps
    assert parts[1].micro_batch_lengths == [[8, 16]]
    assert parts[0].micro_batch_lengths == [[8, 8]]
    assert [mb["uid"] for mb in _micro_batches(parts[1], 0)] == [[2], [0]]


def test_dynamic_batching_descending_order_puts_longest_first():
    batch = _seq_batch(12, 16, seed=3)
    args = {
        "max_tokens_per_microbatch": 32,
        "input_key": "input_ids",
        "input_lengths_key": "len",
        "micro_batch_order": "descending",
    }
    parts, _ = batch.shard_by_batch_size(2, dynamic_batching_args=args)
    for p in parts:
        assert p["len"].tolist() == sorted(p["len"].tolist(), reverse=True)
        assert p.micro_batch_lengths[0] == sorted(p.micro_batch_lengths[0], reverse=True)


def test_dynamic_batching_uneven_shards_get_empty_microbatches():
    batch = BatchedDataDict({"input_ids": torch.zeros(3, 4, dtype=torch.long), "len": [4, 4, 4]})
    args = {"max_tokens_per_microbatch": 4, "input_key": "input_ids", "input_lengths_key": "len"}
    parts, _ = batch.shard_by_batch_size(2, allow_uneven_shards=True, dynamic_batching_args=args)
    assert [p.size for p in parts] == [2, 1]
    sizes = [[mb.size for mb in _micro_batches(p, 0)] for p in parts]
    assert sizes == [[1, 1], [1, 0]]


# ----------------------------------------------------------------------------- sequence packing


def test_packers_on_a_hand_checked_input():
    lengths = [1, 6, 3, 3, 8]  # capacity 10, decreasing order: 8(i4) 6(i1) 3(i2) 3(i3) 1(i0)
    # first fit: the 1 goes to the first bin with room (the 8's bin, 2 free)
    assert _pack_first_fit_decreasing(lengths, 10) == [[4, 0], [1, 2], [3]]
    # best fit: the 1 goes to the fullest bin that fits it (6+3, 1 free)
    assert _pack_best_fit_decreasing(lengths, 10) == [[4], [1, 2, 0], [3]]


def test_modified_first_fit_decreasing_fills_the_large_bins_first():
    # capacity 10: 6 is large (> 5), 5 medium (> 10/3), 3 and the 2s small (> 10/6).
    lengths = [6, 5, 2, 3, 2, 2]
    # The 6's bin (4 free) cannot take the 5; having no medium item, it takes the smallest small
    # item (the last 2, i5) and the largest small one that fits beside it (the 2 of i2). The
    # rest goes first fit decreasing: 5, 3, 2 in one bin. Two bins; FFD needs three (it puts
    # the 3 beside the 6 and strands a 2).
    assert _pack_modified_first_fit_decreasing(lengths, 10) == [[0, 5, 2], [1, 3, 4]]
    assert _pack_first_fit_decreasing(lengths, 10) == [[0, 3], [1, 2, 4], [5]]
    # large 8 and 7 open bins; the medium 5 joins the 7; the 4 tops up the 8; the rest, FFD
    assert _pack_modified_first_fit_decreasing([7, 5, 4, 3, 3, 2, 1, 8], 12) == [[7, 2], [0, 1], [3, 4, 5, 6]]
    assert _pack_concatenative([4, 5, 2, 6, 1], 10) == [[0, 1], [2, 3, 4]]


def test_nemo_rl_packing_names_and_microbatch_order():
    batch = _seq_batch(12, 24, seed=3)
    base = {"max_tokens_per_microbatch": 40, "input_key": "input_ids", "input_lengths_key": "len"}
    default, _ = batch.shard_by_batch_size(2, sequence_packing_args=base)
    mffd, _ = batch.shard_by_batch_size(
        2, sequence_packing_args={**base, "algorithm": "MODIFIED_FIRST_FIT_DECREASING"}
    )
    assert [p.micro_batch_indices for p in default] == [p.micro_batch_indices for p in mffd]
    for algorithm in ("first_fit_shuffle", "concatenative"):
        parts, order = batch.shard_by_batch_size(2, sequence_packing_args={**base, "algorithm": algorithm})
        assert sorted(order) == list(range(12))
        assert all(load <= 40 for p in parts for load in p.micro_batch_lengths[0])
    largest, _ = batch.shard_by_batch_size(2, sequence_packing_args={**base, "microbatch_order": "largest_first"})
    for p in largest:
        assert p.micro_batch_lengths[0] == sorted(p.micro_batch_lengths[0], reverse=True)
    packer, _ = batch.shard_by_batch_size(2, sequence_packing_args={**base, "microbatch_order": "packer"})
    assert sorted(map(sorted, (p.micro_batch_lengths[0] for p in packer))) == sorted(
        map(sorted, (p.micro_batch_lengths[0] for p in largest))
    )
    with pytest.raises(ValueError, match="microbatch_order"):
        batch.shard_by_batch_size(
            2, sequence_packing_args={**base, "microbatch_order": "packer", "micro_batch_order": "ascending"}
        )


@pytest.mark.parametrize(
    "algorithm",
    ["modified_first_fit_decreasing", "first_fit_decreasing", "first_fit_shuffle", "best_fit_decreasing"],
)
@pytest.mark.parametrize(
    "n, gbs, shards, cap, multiple", [(16, 8, 2, 48, 1), (18, 9, 3, 40, 4), (6, None, 2, 200, 2)]
)
def test_sequence_packing_invariants(algorithm, n, gbs, shards, cap, multiple):
    batch = _seq_batch(n, 24, seed=n * 7 + shards)
    lengths = batch["len"].tolist()
    args = {
        "max_tokens_per_microbatch": cap,
        "input_key": "input_ids",
        "input_lengths_key": "len",
        "algorithm": algorithm,
        "sequence_length_pad_multiple": multiple,
    }
    parts, order_idx = batch.shard_by_batch_size(shards, batch_size=gbs, sequence_packing_args=args)
    gbs = gbs or n
    assert sorted(order_idx) == list(range(n))
    assert order_idx == [u for p in parts for u in p["uid"]]
    for g in range(n // gbs):
        assert len({len(p.micro_batch_indices[g]) for p in parts}) == 1, (
            "equal bin counts per shard"
        )
        members = []
        for p in parts:
            bins = _micro_batches(p, g)
            for mb, packed in zip(bins, p.micro_batch_lengths[g], strict=True):
                padded = sum(-(-lengths[u] // multiple) * multiple for u in mb["uid"])
                assert padded == packed <= cap
                assert (
                    mb["input_ids"].shape[1] == 24
                )  # bins are not truncated; the caller packs them
                members.extend(mb["uid"])
        assert sorted(members) == list(range(g * gbs, (g + 1) * gbs)), "each sample exactly once"
    restored = BatchedDataDict.from_batches(parts).reorder_data(order_idx)
    assert restored["uid"] == list(range(n))
    assert torch.equal(restored["input_ids"], batch["input_ids"])
    assert torch.equal(restored["len"], batch["len"])


def test_packing_splits_bins_so_every_shard_gets_one():
    # everything fits one bin, but two shards each need a bin: the bin is split
    batch = BatchedDataDict(
        {"input_ids": torch.zeros(4, 5), "len": [5, 4, 3, 2], "uid": [0, 1, 2, 3]}
    )
    args = {"max_tokens_per_microbatch": 100, "input_key": "input_ids", "input_lengths_key": "len"}
    parts, _ = batch.shard_by_batch_size(2, sequence_packing_args=args)
    loads = sorted(p.micro_batch_lengths[0][0] for p in parts)
    assert loads == [7, 7]  # {5, 2} and {4, 3}: balanced halves


def test_packing_uneven_shards_use_empty_bins():
    batch = BatchedDataDict({"input_ids": torch.zeros(2, 3), "len": [3, 2]})
    args = {"max_tokens_per_microbatch": 3, "input_key": "input_ids", "input_lengths_key": "len"}
    parts, order_idx = batch.shard_by_batch_size(
        3, allow_uneven_shards=True, sequence_packing_args=args
    )
    bins = [[mb.size for mb in _micro_batches(p, 0)] for p in parts]
    assert sorted(bins) == [[0], [1], [1]]
    assert sorted(order_idx) == [0, 1]
