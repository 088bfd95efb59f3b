"""BatchedDataDict: the one exchange type between the driver and every worker group.

A ``BatchedDataDict`` maps names to per-sample data. Every value is either

* a batch-first ``torch.Tensor`` (``shape[0] == size``, at least 1-D), or
* a python ``list`` with one entry per sample (strings, dicts, ground truths ...).

Method names and semantics follow NeMo-RL's type of the same name, so code written
against it ports over: ``from_batches``, ``shard_by_batch_size`` (with dynamic
batching and sequence packing), ``reorder_data``, ``make_microbatch_iterator``,
``chunk``, ``slice``, ``select_indices``, ``repeat_interleave``, ``to``, ``size``.

Micro-batch plans made by ``shard_by_batch_size`` are stored as plain attributes on
each shard, so they travel with it through pickling (Ray object store):

* ``elem_counts_per_gb[g]``: samples of global batch ``g`` held by this shard; the
  shard stores its global batches back to back in that order.
* ``micro_batch_indices[g]``: ``[start, end)`` pairs, relative to the start of global
  batch ``g`` inside this shard, one per micro-batch (packing: one per bin).
* ``micro_batch_lengths[g]``: per micro-batch, the padded sequence length (dynamic
  batching) or the packed token count of the bin (sequence packing).
* ``sequence_key``: the input key whose dim-1 width identifies per-token tensors.
"""

from __future__ import annotations

import math
import random
from collections import UserDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from copy import deepcopy
from typing import Any, TypedDict, TypeVar

import torch

from rlflow.data.batch_sizes import balanced_halves, round_up, split_to_count
from rlflow.distributed.state_transport import pack_state, unpack_state

Self = TypeVar("Self", bound="BatchedDataDict")


class DynamicBatchingArgs(TypedDict, total=False):
    """Options for dynamic micro-batching in ``shard_by_batch_size``.

    Required: ``max_tokens_per_microbatch`` (cap on ``count x padded length`` of a
    micro-batch), ``input_key`` (the ``[B, T, ...]`` token tensor),
    ``input_lengths_key`` (per-sample valid lengths, tensor or list).
    Optional: ``sequence_length_round`` (default 1; every micro-batch length is a
    multiple of it), ``micro_batch_order`` (``"ascending"`` (default) or
    ``"descending"`` sample length; descending puts the largest micro-batch first,
    which surfaces out-of-memory errors at the first step).
    """

    max_tokens_per_microbatch: int
    input_key: str
    input_lengths_key: str
    sequence_length_round: int
    micro_batch_order: str


class SequencePackingArgs(TypedDict, total=False):
    """Options for sequence packing in ``shard_by_batch_size``.

    Required: ``max_tokens_per_microbatch`` (bin capacity in tokens), ``input_key``,
    ``input_lengths_key``. Optional: ``algorithm`` (NeMo-RL's names:
    ``"modified_first_fit_decreasing"`` (default), ``"first_fit_decreasing"``,
    ``"first_fit_shuffle"``, ``"concatenative"``; also ``"best_fit_decreasing"``; any
    case), ``sequence_length_pad_multiple`` (default 1; each sequence occupies its length
    rounded up to this multiple, e.g. ``2 * context_parallel`` for CP/TP alignment),
    ``micro_batch_order`` (``"ascending"`` (default) or ``"descending"`` packed bin size;
    NeMo-RL's spelling ``microbatch_order`` with ``"packer"`` (the packer's own bin order)
    or ``"largest_first"`` is accepted too).
    """

    max_tokens_per_microbatch: int
    input_key: str
    input_lengths_key: str
    algorithm: str
    sequence_length_pad_multiple: int
    micro_batch_order: str
    microbatch_order: str


# "largest_first" and "packer" are NeMo-RL's values (of its key spelled "microbatch_order").
_MICRO_BATCH_ORDERS = ("ascending", "descending", "largest_first", "packer")
_LARGEST_FIRST = ("descending", "largest_first")


# ----------------------------------------------------------------------------------
# small value helpers
# ----------------------------------------------------------------------------------


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _batch_len(key: str, value: Any) -> int:
    if isinstance(value, torch.Tensor):
        if value.ndim == 0:
            raise TypeError(
                f"value for key {key!r} is a 0-d tensor; BatchedDataDict tensors must be "
                "batch-first (shape [B, ...])"
            )
        return value.shape[0]
    if isinstance(value, list):
        return len(value)
    raise TypeError(
        f"value for key {key!r} has type {type(value).__name__}; BatchedDataDict values "
        "must be batch-first torch tensors or lists with one entry per sample"
    )


def _take(key: str, value: Any, indices: list[int], index: torch.Tensor) -> Any:
    """Rows ``indices`` (``index`` is the same as a tensor) of one value: a new tensor or
    list; list entries are shared."""
    _batch_len(key, value)
    if isinstance(value, torch.Tensor):
        return value[index.to(value.device)]
    return [value[i] for i in indices]


def _fit_dim(tensor: torch.Tensor, dim: int, length: int, pad_value: float) -> torch.Tensor:
    """Narrow or right-pad ``tensor`` along ``dim`` to exactly ``length``."""
    current = tensor.shape[dim]
    if current >= length:
        return tensor.narrow(dim, 0, length)
    shape = list(tensor.shape)
    shape[dim] = length
    # new_full + copy works for every dtype (F.pad rejects bool tensors).
    out = tensor.new_full(shape, pad_value)
    out.narrow(dim, 0, current).copy_(tensor)
    return out


def _lengths_as_ints(key: str, lengths: Any) -> list[int]:
    if isinstance(lengths, torch.Tensor):
        if lengths.ndim != 1 or lengths.is_floating_point() or lengths.is_complex():
            raise TypeError(
                f"{key!r} must hold one integer length per sample (1-D int tensor or list)"
            )
        return [int(x) for x in lengths.tolist()]
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in lengths):
        raise TypeError(f"{key!r} must hold one integer length per sample (1-D int tensor or list)")
    return list(lengths)


# ----------------------------------------------------------------------------------
# bin packing (sequence packing)
# ----------------------------------------------------------------------------------


def _decreasing_order(lengths: Sequence[int]) -> list[int]:
    # ties broken by index so plans are deterministic across ranks and runs
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def _pack_first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Longest first, each into the first bin with room; at most 11/9 OPT + 1 bins."""
    return _first_fit(_decreasing_order(lengths), lengths, capacity)


def _pack_best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Longest first, each into the fullest bin that still fits it (tighter bins)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in _decreasing_order(lengths):
        best = -1
        for b, free in enumerate(room):
            if lengths[i] <= free and (best < 0 or free < room[best]):
                best = b
        if best < 0:
            bins.append([i])
            room.append(capacity - lengths[i])
        else:
            bins[best].append(i)
            room[best] -= lengths[i]
    return bins


def _first_fit(order: Sequence[int], lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Items in ``order``, each into the first bin with room."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def _pack_first_fit_shuffle(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First fit in a random order (seeded: every rank and run makes the same plan)."""
    order = list(range(len(lengths)))
    random.Random(len(lengths)).shuffle(order)
    return _first_fit(order, lengths, capacity)


def _pack_concatenative(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """In the given order; a new bin whenever the next item does not fit the current one."""
    bins: list[list[int]] = []
    free = 0
    for i, length in enumerate(lengths):
        if not bins or length > free:
            bins.append([])
            free = capacity
        bins[-1].append(i)
        free -= length
    return bins


def _pack_modified_first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Johnson and Garey's MFFD (1985), at most 71/60 OPT + 1 bins.

    Items are large (> C/2), medium (> C/3), small (> C/6) or tiny. Each large item opens
    a bin; going forward, each large bin takes the largest medium item that fits; going
    backward, each large bin without a medium item takes the smallest small item and the
    largest small item that fits beside it; going forward again, each large bin is topped up
    with the largest remaining items that fit; first fit decreasing packs what is left.
    """
    order = _decreasing_order(lengths)
    large = [i for i in order if lengths[i] * 2 > capacity]
    medium = [i for i in order if capacity < lengths[i] * 3 and lengths[i] * 2 <= capacity]
    small = [i for i in order if capacity < lengths[i] * 6 and lengths[i] * 3 <= capacity]
    bins = [[i] for i in large]
    room = [capacity - lengths[i] for i in large]

    for b in range(len(bins)):
        fits = [i for i in medium if lengths[i] <= room[b]]
        if fits:
            medium.remove(fits[0])
            bins[b].append(fits[0])
            room[b] -= lengths[fits[0]]
    for b in reversed(range(len(bins))):
        if len(bins[b]) > 1 or len(small) < 2 or lengths[small[-1]] + lengths[small[-2]] > room[b]:
            continue
        smallest = small.pop()
        partner = next(i for i in small if lengths[i] + lengths[smallest] <= room[b])
        small.remove(partner)
        bins[b] += [smallest, partner]
        room[b] -= lengths[smallest] + lengths[partner]
    placed = {i for members in bins for i in members}
    rest = [i for i in order if i not in placed]
    for b in range(len(bins)):
        while rest and lengths[rest[-1]] <= room[b]:
            pick = next(i for i in rest if lengths[i] <= room[b])
            rest.remove(pick)
            bins[b].append(pick)
            room[b] -= lengths[pick]
    return bins + _first_fit(rest, lengths, capacity)


_PACKERS: dict[str, Callable[[Sequence[int], int], list[list[int]]]] = {
    "modified_first_fit_decreasing": _pack_modified_first_fit_decreasing,
    "first_fit_decreasing": _pack_first_fit_decreasing,
    "first_fit_shuffle": _pack_first_fit_shuffle,
    "best_fit_decreasing": _pack_best_fit_decreasing,
    "concatenative": _pack_concatenative,
}
PACKING_ALGORITHMS = tuple(_PACKERS)


def _split_bins_to_multiple(
    bins: list[list[int]], lengths: Sequence[int], multiple: int
) -> list[list[int]]:
    """Add bins until their count is a positive multiple of ``multiple``, halving the bin with
    the most sequences (then most tokens) into two of similar token load; a split never exceeds
    the capacity. Empty bins appear only when every bin holds a single sequence."""
    target = max(1, math.ceil(len(bins) / multiple)) * multiple
    return split_to_count(
        bins, target,
        cost=lambda b: (len(b), sum(lengths[i] for i in b)),
        halve=lambda b: balanced_halves(b, lengths.__getitem__),
    )


def _deal_bins_to_shards(loads: Sequence[int], shards: int) -> list[list[int]]:
    """Give each shard ``len(loads) / shards`` bins while balancing token load.

    Heaviest bin first, each to the lightest shard that still has a free slot.
    """
    per_shard = len(loads) // shards
    owned: list[list[int]] = [[] for _ in range(shards)]
    total = [0] * shards
    for b in sorted(range(len(loads)), key=lambda b: (-loads[b], b)):
        open_shards = [s for s in range(shards) if len(owned[s]) < per_shard]
        s = min(open_shards, key=lambda s: (total[s], s))
        owned[s].append(b)
        total[s] += loads[b]
    return owned


# ----------------------------------------------------------------------------------
# dynamic micro-batching
# ----------------------------------------------------------------------------------


def _greedy_microbatches(padded: Sequence[int], cap: int) -> list[list[int]]:
    """Split consecutive samples into ``[start, end)`` runs with ``count * max <= cap``."""
    ranges: list[list[int]] = []
    run_max = 0
    for i, length in enumerate(padded):
        if ranges and (ranges[-1][1] - ranges[-1][0] + 1) * max(run_max, length) <= cap:
            ranges[-1][1] += 1
            run_max = max(run_max, length)
        else:
            ranges.append([i, i + 1])
            run_max = length
    return ranges


def _split_microbatches_to(
    ranges: list[list[int]], padded: Sequence[int], count: int
) -> list[list[int]]:
    """Split runs (heaviest first, at their middle) until there are ``count``; pad with empty
    runs. Halving a run never raises its ``count * max`` product, so the cap still holds.
    Empty runs (``start == end``) only appear when the shard has fewer samples than ``count``."""
    runs = split_to_count(
        [list(range(a, b)) for a, b in ranges], count,
        cost=lambda run: len(run) * max((padded[i] for i in run), default=0),
        halve=lambda run: (run[: len(run) // 2], run[len(run) // 2 :]),
    )
    out, end = [], 0
    for run in runs:
        start = run[0] if run else end
        end = start + len(run)
        out.append([start, end])
    return out


def _validated_args(
    name: str, args: Mapping[str, Any], required: tuple[str, ...], defaults: Mapping[str, Any]
) -> dict[str, Any]:
    if not isinstance(args, Mapping):
        raise TypeError(f"{name} must be a dict, got {type(args).__name__}")
    args = dict(args)
    if "microbatch_order" in args:  # NeMo-RL's spelling
        if "micro_batch_order" in args:
            raise ValueError(f"{name} has both 'microbatch_order' and 'micro_batch_order'; keep one")
        args["micro_batch_order"] = args.pop("microbatch_order")
    unknown = sorted(set(args) - set(required) - set(defaults))
    if unknown:
        raise ValueError(
            f"{name} has unknown keys {unknown}; allowed: {sorted([*required, *defaults])}"
        )
    missing = [k for k in required if k not in args]
    if missing:
        raise ValueError(f"{name} is missing required keys {missing}")
    out = {**defaults, **args}
    if out["micro_batch_order"] not in _MICRO_BATCH_ORDERS:
        raise ValueError(
            f"{name}['micro_batch_order'] is {out['micro_batch_order']!r}; "
            f"choose one of {list(_MICRO_BATCH_ORDERS)}"
        )
    return out


# ----------------------------------------------------------------------------------
# the exchange type
# ----------------------------------------------------------------------------------


class BatchedDataDict(UserDict):
    """A dict of batch-first tensors and per-sample lists (see the module docstring).

    It pickles with its micro-batch plan, so it can be passed through Ray as is.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.micro_batch_indices: list[list[list[int]]] | None = None
        self.micro_batch_lengths: list[list[int]] | None = None
        self.elem_counts_per_gb: list[int] | None = None
        self.sequence_key: str | None = None

    # Ray pickles a batch for every call and result: its CPU tensors go as raw buffers, not
    # through torch.save (see rlflow.distributed.state_transport).
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        tensors = {k: v for k, v in self.data.items() if torch.is_tensor(v) and v.device.type == "cpu"}
        others = {k: v for k, v in self.data.items() if k not in tensors}
        state["data"] = (pack_state(tensors), others, list(self.data))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        packed, others, order = state.pop("data")
        self.__dict__.update(state)
        values = {**unpack_state(packed, writable=True), **others}
        self.data = {key: values[key] for key in order}

    # -- construction ---------------------------------------------------------------

    @classmethod
    def from_batches(
        cls: type[Self],
        batches: Sequence[Mapping[str, Any]],
        pad_value_dict: Mapping[str, int | float] | None = None,
    ) -> Self:
        """Concatenate ``batches`` along the batch dimension.

        1-D tensors and lists are concatenated. Tensors with 2+ dims are right-padded
        along dim 1 to the longest in the list (pad value ``pad_value_dict[key]``,
        default 0) and then concatenated; dims after 1 must match. Every batch must
        have the same keys, and a key must have the same kind (list or tensor of the
        same rank) in every batch.
        """
        if isinstance(batches, Mapping) or not isinstance(batches, Sequence):
            raise TypeError("batches must be a list of dicts (one per batch)")
        if len(batches) == 0:
            raise ValueError("batches is empty; pass at least one batch to from_batches")
        pad_value_dict = dict(pad_value_dict or {})
        keys = list(batches[0].keys())
        for b, batch in enumerate(batches):
            if not isinstance(batch, Mapping):
                raise TypeError(f"batches[{b}] is a {type(batch).__name__}, expected a dict")
            if set(batch.keys()) != set(keys):
                missing = sorted(set(keys) - set(batch.keys()))
                extra = sorted(set(batch.keys()) - set(keys))
                raise ValueError(
                    f"batches[{b}] keys differ from batches[0]: missing {missing}, extra {extra}; "
                    "all batches must have the same keys"
                )
        out = cls()
        for key in keys:
            values = [batch[key] for batch in batches]
            for v in values:
                _batch_len(key, v)
            if all(isinstance(v, list) for v in values):
                out[key] = [item for v in values for item in v]
            elif all(isinstance(v, torch.Tensor) for v in values):
                ranks = {v.ndim for v in values}
                if len(ranks) != 1:
                    raise ValueError(
                        f"key {key!r} has tensors of different ranks {sorted(ranks)} across batches"
                    )
                if values[0].ndim == 1:
                    out[key] = torch.cat(values)
                    continue
                trailing = {tuple(v.shape[2:]) for v in values}
                if len(trailing) != 1:
                    raise ValueError(
                        f"key {key!r} has tensors whose dims after dim 1 differ across "
                        f"batches: {sorted(trailing)}"
                    )
                width = max(v.shape[1] for v in values)
                pad = pad_value_dict.get(key, 0)
                out[key] = torch.cat([_fit_dim(v, 1, width, pad) for v in values])
            else:
                kinds = sorted({type(v).__name__ for v in values})
                raise TypeError(
                    f"key {key!r} mixes value types {kinds} across batches; "
                    "use all tensors or all lists"
                )
        return out

    # -- inspection -----------------------------------------------------------------

    @property
    def size(self) -> int:
        """Batch size shared by every value (0 for an empty dict)."""
        sizes = {key: _batch_len(key, value) for key, value in self.data.items()}
        if len(set(sizes.values())) > 1:
            listing = ", ".join(f"{k}={n}" for k, n in sizes.items())
            raise ValueError(
                f"values disagree on batch size ({listing}); "
                "every value needs the same leading size"
            )
        return next(iter(sizes.values()), 0)

    # -- row selection --------------------------------------------------------------

    def _rows(self, indices: list[int]) -> BatchedDataDict:
        out = type(self)()
        index = torch.tensor(indices, dtype=torch.long)
        for key, value in self.data.items():
            out[key] = _take(key, value, indices, index)
        return out

    def slice(self, start: int, end: int) -> SlicedDataDict:
        """Rows ``[start, end)``; requires ``0 <= start <= end <= size``. Tensors are views."""
        size = self.size
        if not (0 <= start <= end <= size):
            raise ValueError(
                f"slice({start}, {end}) is out of range for batch size {size}; "
                "need 0 <= start <= end <= size"
            )
        out = SlicedDataDict()
        for key, value in self.data.items():
            out[key] = value[start:end]
        return out

    def select_indices(self, indices: Sequence[int] | torch.Tensor) -> BatchedDataDict:
        """Rows at ``indices`` (any order, repeats allowed), as the same class."""
        if isinstance(indices, torch.Tensor):
            if indices.ndim != 1 or indices.is_floating_point() or indices.dtype == torch.bool:
                raise TypeError("indices must be a 1-D integer tensor or a list of ints")
            index_list = [int(i) for i in indices.tolist()]
        else:
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
                raise TypeError("indices must be a 1-D integer tensor or a list of ints")
            index_list = list(indices)
        size = self.size
        bad = [i for i in index_list if not 0 <= i < size]
        if bad:
            raise ValueError(f"indices {bad[:5]} are out of range for batch size {size}")
        return self._rows(index_list)

    def chunk(self, rank: int, chunks: int) -> SlicedDataDict:
        """The ``rank``-th of ``chunks`` equal contiguous parts; ``chunks`` must divide size."""
        _check_positive_int("chunks", chunks)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < chunks:
            raise ValueError(f"rank must be an int in [0, {chunks}), got {rank!r}")
        size = self.size
        if size % chunks:
            raise ValueError(f"batch size {size} is not divisible by chunks={chunks}")
        step = size // chunks
        return self.slice(rank * step, (rank + 1) * step)

    # -- transforms -----------------------------------------------------------------

    def repeat_interleave(self, num_repeats: int) -> BatchedDataDict:
        """Each sample repeated ``num_repeats`` times consecutively: [a, b] -> [a, a, b, b].

        List entries are deep-copied so repeats can be mutated independently.
        """
        _check_positive_int("num_repeats", num_repeats)
        out = type(self)()
        for key, value in self.data.items():
            _batch_len(key, value)
            if isinstance(value, torch.Tensor):
                out[key] = value.repeat_interleave(num_repeats, dim=0)
            else:
                out[key] = [deepcopy(item) for item in value for _ in range(num_repeats)]
        return out

    def to(self, device: str | torch.device) -> BatchedDataDict:
        """In place: move every tensor to ``device``. Returns self."""
        for key, value in self.data.items():
            if isinstance(value, torch.Tensor):
                self.data[key] = value.to(device)
        return self

    def reorder_data(self, reorded_indices: Sequence[int] | torch.Tensor) -> BatchedDataDict:
        """In place: undo the permutation returned by ``shard_by_batch_size``.

        ``reorded_indices[p]`` is the original position of row ``p`` of this dict
        (the shards' results concatenated in rank order); afterwards row ``i`` is the
        original sample ``i``. The micro-batch plan no longer applies and is cleared.
        Returns self.
        """
        order = (
            [int(i) for i in reorded_indices.tolist()]
            if isinstance(reorded_indices, torch.Tensor)
            else list(reorded_indices)
        )
        size = self.size
        if sorted(order) != list(range(size)):
            raise ValueError(
                f"reorded_indices must be a permutation of range({size}) (the indices returned by "
                "shard_by_batch_size for this batch)"
            )
        inverse = [0] * size
        for position, original in enumerate(order):
            inverse[original] = position
        index = torch.tensor(inverse, dtype=torch.long)
        for key, value in list(self.data.items()):
            self.data[key] = _take(key, value, inverse, index)
        self.micro_batch_indices = self.micro_batch_lengths = self.elem_counts_per_gb = None
        return self

    # -- micro-batch iteration ------------------------------------------------------

    def make_microbatch_iterator(self, microbatch_size: int) -> Iterator[SlicedDataDict]:
        """Consecutive slices of ``microbatch_size`` rows; it must divide the size."""
        _check_positive_int("microbatch_size", microbatch_size)
        size = self.size
        if size % microbatch_size:
            raise ValueError(
                f"batch size {size} is not divisible by microbatch_size={microbatch_size}"
            )
        for start in range(0, size, microbatch_size):
            yield self.slice(start, start + microbatch_size)

    # -- sharding -------------------------------------------------------------------

    def shard_by_batch_size(
        self,
        shards: int,
        batch_size: int | None = None,
        allow_uneven_shards: bool = False,
        dynamic_batching_args: DynamicBatchingArgs | None = None,
        sequence_packing_args: SequencePackingArgs | None = None,
    ) -> list[SlicedDataDict] | tuple[list[SlicedDataDict], list[int]]:
        """Split into ``shards`` parts so that each global batch is spread over all shards.

        The batch is cut into consecutive global batches of ``batch_size`` (default:
        the whole batch); each global batch is split into ``shards`` parts and shard
        ``s`` holds its part of every global batch, in global-batch order. Example:
        8 samples, ``batch_size=4``, ``shards=2`` -> shard 0 = [0, 1, 4, 5],
        shard 1 = [2, 3, 6, 7]. ``batch_size`` must divide the size and ``shards``
        must divide ``batch_size``; with ``allow_uneven_shards`` (``batch_size`` must
        then be None) the parts are ``ceil(size / shards)`` long and the last ones
        are shorter or empty.

        Dynamic batching: within each global batch, samples are sorted by length and
        dealt round-robin to shards (similar lengths per shard); each shard cuts its
        samples into micro-batches with ``count x rounded max length <=
        max_tokens_per_microbatch`` and the heaviest ones are halved until every
        shard has the same number (FSDP collectives must line up).

        Sequence packing: within each global batch, sequences (lengths rounded up to
        ``sequence_length_pad_multiple``) are bin-packed under the cap; bins are
        split until their count is a multiple of ``shards`` and dealt so every shard
        gets the same number of bins with balanced tokens. Empty bins appear only
        when there are fewer sequences than needed bins (uneven shards).

        Returns the list of shards; with dynamic batching or packing returns
        ``(shards, indices)`` where ``indices[p]`` is the original position of row
        ``p`` of the shards concatenated in rank order (pass it to
        ``reorder_data``).
        """
        _check_positive_int("shards", shards)
        if dynamic_batching_args is not None and sequence_packing_args is not None:
            raise ValueError("pass dynamic_batching_args or sequence_packing_args, not both")
        if allow_uneven_shards and batch_size is not None:
            raise ValueError("batch_size must be None when allow_uneven_shards=True")
        total = self.size
        if batch_size is None:
            batch_size = total
        else:
            _check_positive_int("batch_size", batch_size)
            if total % batch_size:
                raise ValueError(f"batch size {total} is not divisible by batch_size={batch_size}")
        if not allow_uneven_shards and batch_size % shards:
            raise ValueError(
                f"batch_size {batch_size} is not divisible by shards={shards}; "
                "change one of them or pass allow_uneven_shards=True (with batch_size=None)"
            )
        num_gb = total // batch_size if batch_size else 0

        if dynamic_batching_args is not None:
            args = _validated_args(
                "dynamic_batching_args",
                dynamic_batching_args,
                ("max_tokens_per_microbatch", "input_key", "input_lengths_key"),
                {"sequence_length_round": 1, "micro_batch_order": "ascending"},
            )
            _check_positive_int(
                "dynamic_batching_args['sequence_length_round']", args["sequence_length_round"]
            )
            plan = self._plan_dynamic(shards, batch_size, num_gb, args)
            sequence_key = args["input_key"]
        elif sequence_packing_args is not None:
            args = _validated_args(
                "sequence_packing_args",
                sequence_packing_args,
                ("max_tokens_per_microbatch", "input_key", "input_lengths_key"),
                {
                    "algorithm": "modified_first_fit_decreasing",
                    "sequence_length_pad_multiple": 1,
                    "micro_batch_order": "ascending",
                },
            )
            args["algorithm"] = str(args["algorithm"]).lower()  # NeMo-RL takes any case
            if args["algorithm"] not in _PACKERS:
                raise ValueError(
                    f"sequence_packing_args['algorithm'] is {args['algorithm']!r}; "
                    f"choose one of {sorted(_PACKERS)}"
                )
            _check_positive_int(
                "sequence_packing_args['sequence_length_pad_multiple']",
                args["sequence_length_pad_multiple"],
            )
            plan = self._plan_packing(shards, batch_size, num_gb, args)
            sequence_key = args["input_key"]
        else:
            part = math.ceil(batch_size / shards) if batch_size else 0
            plan = []
            for g in range(num_gb):
                gb_start, gb_end = g * batch_size, (g + 1) * batch_size
                per_shard = []
                for s in range(shards):
                    lo = min(gb_start + s * part, gb_end)
                    hi = min(gb_start + (s + 1) * part, gb_end)
                    per_shard.append((list(range(lo, hi)), None, None))
                plan.append(per_shard)
            sequence_key = None
        planned = sequence_key is not None

        result: list[SlicedDataDict] = []
        for s in range(shards):
            rows = [i for gb in plan for i in gb[s][0]]
            shard = SlicedDataDict(self._rows(rows).data)
            shard.elem_counts_per_gb = [len(gb[s][0]) for gb in plan]
            if planned:
                shard.sequence_key = sequence_key
                shard.micro_batch_indices = [gb[s][1] for gb in plan]
                shard.micro_batch_lengths = [gb[s][2] for gb in plan]
            result.append(shard)
        if not planned:
            return result
        order = [i for s in range(shards) for gb in plan for i in gb[s][0]]
        return result, order

    def _sharding_lengths(self, name: str, args: Mapping[str, Any]) -> list[int]:
        """Validated per-sample lengths for the sharding plans."""
        _check_positive_int(
            f"{name}['max_tokens_per_microbatch']", args["max_tokens_per_microbatch"]
        )
        for field in ("input_key", "input_lengths_key"):
            if args[field] not in self.data:
                raise ValueError(
                    f"{name}[{field!r}] is {args[field]!r}, which is not a key of this batch"
                )
        inputs = self.data[args["input_key"]]
        if not isinstance(inputs, torch.Tensor) or inputs.ndim < 2:
            raise ValueError(
                f"{name}['input_key'] {args['input_key']!r} must name a [B, T, ...] tensor"
            )
        lengths = _lengths_as_ints(args["input_lengths_key"], self.data[args["input_lengths_key"]])
        width = inputs.shape[1]
        bad = [n for n in lengths if not 0 <= n <= width]
        if bad:
            raise ValueError(
                f"{args['input_lengths_key']!r} has lengths {bad[:5]} outside [0, {width}] "
                f"(the width of {args['input_key']!r})"
            )
        return lengths

    def _plan_dynamic(
        self, shards: int, batch_size: int, num_gb: int, args: Mapping[str, Any]
    ) -> list[list[tuple]]:
        lengths = self._sharding_lengths("dynamic_batching_args", args)
        cap, step = args["max_tokens_per_microbatch"], args["sequence_length_round"]
        sign = -1 if args["micro_batch_order"] in _LARGEST_FIRST else 1
        # every sample occupies at least one rounded slot, so a micro-batch never has width 0
        padded = [round_up(max(n, 1), step) for n in lengths]
        too_long = [p for p in padded if p > cap]
        if too_long:
            raise ValueError(
                f"a sample's rounded length {max(too_long)} exceeds "
                f"dynamic_batching_args['max_tokens_per_microbatch']={cap}; "
                "raise the cap or shorten sequences"
            )
        plan = []
        for g in range(num_gb):
            members = range(g * batch_size, (g + 1) * batch_size)
            ordered = sorted(members, key=lambda i: (sign * lengths[i], i))
            dealt = [ordered[s::shards] for s in range(shards)]
            runs = [_greedy_microbatches([padded[i] for i in rows], cap) for rows in dealt]
            count = max(len(r) for r in runs)
            per_shard = []
            for rows, shard_runs in zip(dealt, runs, strict=True):
                shard_padded = [padded[i] for i in rows]
                shard_runs = _split_microbatches_to(shard_runs, shard_padded, count)
                run_lengths = [max(shard_padded[a:b], default=0) for a, b in shard_runs]
                per_shard.append((rows, shard_runs, run_lengths))
            plan.append(per_shard)
        return plan

    def _plan_packing(
        self, shards: int, batch_size: int, num_gb: int, args: Mapping[str, Any]
    ) -> list[list[tuple]]:
        lengths = self._sharding_lengths("sequence_packing_args", args)
        cap, multiple = args["max_tokens_per_microbatch"], args["sequence_length_pad_multiple"]
        packer = _PACKERS[args["algorithm"]]
        order = args["micro_batch_order"]
        padded = [round_up(max(n, 1), multiple) for n in lengths]
        too_long = [p for p in padded if p > cap]
        if too_long:
            raise ValueError(
                f"a sequence's padded length {max(too_long)} exceeds "
                f"sequence_packing_args['max_tokens_per_microbatch']={cap}; "
                "raise the cap or shorten sequences"
            )
        plan = []
        for g in range(num_gb):
            base = g * batch_size
            local = padded[base : base + batch_size]
            bins = _split_bins_to_multiple(packer(local, cap), local, shards)
            loads = [sum(local[i] for i in b) for b in bins]
            per_shard = []
            for owned in _deal_bins_to_shards(loads, shards):
                if order == "packer":
                    owned = sorted(owned)
                else:
                    owned = sorted(owned, key=lambda b: (-loads[b] if order in _LARGEST_FIRST else loads[b], b))
                rows: list[int] = []
                ranges: list[list[int]] = []
                for b in owned:
                    ranges.append([len(rows), len(rows) + len(bins[b])])
                    rows.extend(base + i for i in sorted(bins[b]))
                per_shard.append((rows, ranges, [loads[b] for b in owned]))
            plan.append(per_shard)
        return plan


class SlicedDataDict(BatchedDataDict):
    """A ``BatchedDataDict`` that is a slice or shard of a larger batch (a type marker)."""
