"""Prompt dataset for RL: rows in verl's schema -> left-padded prompt token tensors.

Each row holds ``prompt`` (chat messages ``[{"role": ..., "content": ...}, ...]``),
``data_source``, ``reward_model`` (``{"style", "ground_truth"}``) and ``extra_info``. Files are
parquet (``.parquet``) or JSON lines (``.jsonl``, one object per line). Prompts are rendered
with the tokenizer's chat template (generation prompt appended) and tokenised once, in batches,
when the dataset is built; ``__getitem__`` only slices and pads.

The dataset holds no iteration state: the shuffled order and the position in it belong to the
trainer (``PromptBatches``), which is what a checkpoint saves.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from rlflow.data.batched_data_dict import BatchedDataDict
from rlflow.errors import ConfigError, DataError
from rlflow.utils.torch_functional import TRUNCATION_MODES, compute_position_ids, postprocess_data

# Conversations rendered and tokenised per call: big enough that the fast tokenizer batches
# efficiently, small enough that the intermediate Python lists of ids stay bounded.
_TOKENIZE_CHUNK = 8192

DATA_FILE_SUFFIXES = (".parquet", ".jsonl")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ----------------------------------------------------------------------------- file reading


def _missing_column(
    path: str, column: str, present: Sequence[str], key_names: Mapping[str, str], where: str = ""
) -> DataError:
    setting = key_names.get(column, "the matching column-name argument")
    return DataError(
        f"{where}data file {path!r} has no column {column!r} (columns: {sorted(present)}); "
        f"set {setting} to the column that holds it"
    )


def _read_parquet(
    path: str, required: Sequence[str], optional: Sequence[str], key_names: Mapping[str, str]
) -> dict[str, list[Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        for column in required:
            if column not in names:
                raise _missing_column(path, column, names, key_names)
        # Reading only the used columns skips wide unused ones (long solutions, images ...).
        wanted = [c for c in dict.fromkeys((*required, *optional)) if c in names]
        table = pq.read_table(path, columns=wanted)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"cannot read data file {path!r} as parquet: {_first_line(exc)}") from exc
    columns = {name: table.column(name).to_pylist() for name in wanted}
    for name in optional:
        columns.setdefault(name, [None] * table.num_rows)
    return columns


def _read_jsonl(
    path: str, required: Sequence[str], optional: Sequence[str], key_names: Mapping[str, str]
) -> dict[str, list[Any]]:
    names = list(dict.fromkeys((*required, *optional)))
    columns: dict[str, list[Any]] = {name: [] for name in names}
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"line {line_no} of data file {path!r} is not valid JSON: {_first_line(exc)}"
                    ) from None
                if not isinstance(obj, dict):
                    raise DataError(
                        f"line {line_no} of data file {path!r} is a JSON {type(obj).__name__}; "
                        "each line of a .jsonl file must be one JSON object (a row)"
                    )
                for column in required:
                    if column not in obj:
                        raise _missing_column(path, column, list(obj), key_names, f"line {line_no} of ")
                # Like a nullable parquet column, a key missing from a line reads as None.
                for name in names:
                    columns[name].append(obj.get(name))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read data file {path!r} as UTF-8 JSON lines: {_first_line(exc)}") from exc
    return columns


def read_data_file(
    path: str,
    required: Sequence[str],
    optional: Sequence[str] = (),
    key_names: Mapping[str, str] | None = None,
) -> dict[str, list[Any]]:
    """Read the named columns of one ``.parquet`` or ``.jsonl`` file as Python lists.

    Every returned list has one entry per row, in file order. Optional columns absent from the
    file (or from a jsonl line) are ``None``. ``key_names`` maps a column to the setting a user
    changes to rename it (shown in the missing-column error). Raises ``FileNotFoundError`` for
    a missing file and ``DataError`` (a ``ValueError``) naming the file for an unknown
    extension, an unreadable file or a missing required column.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} not found; check data.train_files / data.val_files")
    key_names = dict(key_names or {})
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".parquet":
        return _read_parquet(path, required, optional, key_names)
    if suffix == ".jsonl":
        return _read_jsonl(path, required, optional, key_names)
    raise DataError(
        f"data file {path!r} has extension {suffix or '(none)'!r}; rlflow reads "
        f"{' and '.join(DATA_FILE_SUFFIXES)} files (convert it, or rename a JSON-lines file to .jsonl)"
    )


def normalise_data_files(data_files: Any) -> list[str]:
    """One path or a list of paths -> a non-empty list of str paths (``demo:`` resolved).

    Raises TypeError for a non-path entry and ConfigError for an empty list.
    """
    from rlflow.demo.assets import resolve_demo_path

    if isinstance(data_files, (str, os.PathLike)):
        data_files = [data_files]
    try:
        entries = list(data_files)
    except TypeError:
        raise TypeError(f"data_files must be a path or a list of paths, got {data_files!r}") from None
    files = []
    for f in entries:
        if not isinstance(f, (str, os.PathLike)):
            raise TypeError(f"data_files entries must be paths, got {f!r}")
        files.append(os.fspath(resolve_demo_path(os.fspath(f))))
    if not files:
        raise ConfigError("data_files is empty; give at least one .parquet or .jsonl file")
    return files


def is_chat_messages(messages: Any) -> bool:
    """True for a non-empty list of ``{"role": str, "content": str, ...}`` mappings."""
    return (
        isinstance(messages, list)
        and len(messages) > 0
        and all(
            isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    )


# ----------------------------------------------------------------------------- tokenisation


class ChatEncoder:
    """Renders conversations with a chat template and tokenises them, a batch per call.

    ``encoder(conversations) -> (texts, ids)``: ``texts[i]`` is conversation ``i`` rendered
    with ``add_generation_prompt=True`` and ``ids[i]`` its token ids (no special tokens added
    beyond what the template writes).

    For Hugging Face fast tokenizers the ids come straight from the Rust backend's
    ``encode_batch_fast`` (no offsets, no per-row ``BatchEncoding`` conversion), which made
    render + tokenise 1.6x faster than ``tokenizer(texts)`` on 100k demo-tokenizer prompts. The
    shortcut is taken only when the backend carries no truncation/padding state, and only
    after checking on the first texts that it returns exactly what
    ``tokenizer(texts, add_special_tokens=False)`` returns.
    Safe to call from several threads.
    """

    def __init__(self, tokenizer: Any, template_kwargs: Mapping[str, Any] | None = None) -> None:
        self.tokenizer = tokenizer
        self.template_kwargs = dict(template_kwargs or {})
        self._backend: Any = None
        self._decided = False
        self._lock = threading.Lock()

    def _backend_candidate(self) -> Any:
        from transformers import PreTrainedTokenizerFast

        if not isinstance(self.tokenizer, PreTrainedTokenizerFast):
            return None
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None or not hasattr(backend, "encode_batch_fast"):
            return None
        if backend.truncation is not None or backend.padding is not None:
            return None
        if bool(getattr(backend, "encode_special_tokens", False)) != bool(
            getattr(self.tokenizer, "split_special_tokens", False)
        ):
            return None
        return backend

    def _decide(self, texts: list[str]) -> None:
        with self._lock:
            if self._decided:
                return
            backend = self._backend_candidate()
            if backend is not None:
                probe = texts[:16]
                fast = [e.ids for e in backend.encode_batch_fast(probe, add_special_tokens=False)]
                slow = self.tokenizer(probe, add_special_tokens=False, verbose=False)["input_ids"]
                self._backend = backend if fast == [list(ids) for ids in slow] else None
            self._decided = True

    def render(self, conversations: list[Any]) -> list[str]:
        import jinja2  # a dependency of chat templates; imported where they are used

        try:
            return self.tokenizer.apply_chat_template(
                conversations, tokenize=False, add_generation_prompt=True, **self.template_kwargs
            )
        except (ValueError, TypeError, jinja2.TemplateError) as exc:
            raise DataError(
                f"cannot render prompts with the tokenizer's chat template: {_first_line(exc)}"
            ) from exc

    def encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if not self._decided:
            self._decide(texts)
        if self._backend is not None:
            return [e.ids for e in self._backend.encode_batch_fast(texts, add_special_tokens=False)]
        # verbose=False: prompts longer than model_max_length are expected here (they are
        # filtered or truncated next), so the tokenizer's warning about them is noise.
        return [
            list(ids) for ids in self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        ]

    def __call__(self, conversations: list[Any]) -> tuple[list[str], list[list[int]]]:
        texts = self.render(conversations)
        return texts, self.encode(texts)


def iter_chunk_results(
    fn: Callable[[int, Sequence[Any]], Any], items: Sequence[Any], chunk_size: int, workers: int
) -> Iterator[tuple[int, Any]]:
    """Yield ``(start, fn(start, items[start:start + chunk_size]))`` for consecutive chunks, in order.

    With ``workers > 1`` up to ``workers`` chunks run at once in a thread pool (the Rust
    tokenizer releases the GIL, so one chunk's encoding overlaps another's template
    rendering); results still come back in order, and closing the iterator early cancels the
    chunks that have not started. Threads, not processes: nothing to pickle, no start-up cost,
    and no fork inside a Ray worker that already runs threads.
    """
    starts = range(0, len(items), chunk_size)
    if workers <= 1 or len(starts) <= 1:
        for start in starts:
            yield start, fn(start, items[start : start + chunk_size])
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rlflow-tokenize")
    try:
        todo = iter(starts)
        pending: deque = deque()
        for start in itertools.islice(todo, workers):
            pending.append((start, pool.submit(fn, start, items[start : start + chunk_size])))
        while pending:
            start, future = pending.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(fn, nxt, items[nxt : nxt + chunk_size])))
            yield start, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- dataset


class RLHFDataset(Dataset):
    """Tokenised prompts from one or more parquet / jsonl files (rows concatenated in file order).

    Args:
        data_files: a ``.parquet`` / ``.jsonl`` path or a list of them (``demo:`` paths are
            resolved); the format follows the extension.
        tokenizer: a Hugging Face tokenizer with a chat template and a pad token.
        prompt_key: column holding the chat messages.
        max_prompt_length: width of the padded ``input_ids``.
        truncation: ``left | right | middle | error`` for prompts longer than
            ``max_prompt_length`` (only reachable when ``filter_overlong_prompts`` is False;
            with ``error`` such a prompt fails here, at construction).
        filter_overlong_prompts: drop prompts longer than ``max_prompt_length``
            (``num_dropped`` counts them).
        filter_overlong_prompts_workers: threads rendering + tokenising chunks of
            ``_TOKENIZE_CHUNK`` prompts at once (1 = serial); the result is identical for any
            value. Fast tokenizers already spread one batch over the cores and only the
            template rendering holds the GIL, so the gain is small: +9% / -4% on 2 cores for a
            BPE / the demo tokenizer (docs/benchmarks.md).
        max_samples: keep only the first ``max_samples`` rows that survive filtering (-1: all).
            Tokenisation stops as soon as enough rows are kept, so a small ``max_samples`` on a
            big file is cheap; ``num_dropped`` then counts the rows examined so far.
        return_raw_chat: also return the messages as ``raw_prompt``.
        return_full_prompt: also return the rendered prompt text (chat template applied,
            generation prompt appended, before any truncation) as ``full_prompts``.
        apply_chat_template_kwargs: extra keyword arguments for ``apply_chat_template``.

    ``self[i]`` is a dict with ``input_ids``, ``attention_mask``, ``position_ids`` (1-D long,
    length ``max_prompt_length``, left padded), ``raw_prompt_ids`` (list of unpadded ids,
    truncated like ``input_ids``), ``data_source``, ``reward_model``, ``extra_info`` (the row's
    dict as stored, its own ``index`` included), ``index`` (row position across all files
    before filtering, unique even when per-file ``extra_info.index`` values repeat),
    ``tools_kwargs`` (``extra_info["tools_kwargs"]``, ``{}`` when absent) and, if asked,
    ``raw_prompt`` / ``full_prompts``.
    """

    def __init__(
        self,
        data_files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        tokenizer: Any,
        *,
        prompt_key: str = "prompt",
        max_prompt_length: int = 64,
        truncation: str = "error",
        filter_overlong_prompts: bool = True,
        filter_overlong_prompts_workers: int = 1,
        max_samples: int = -1,
        return_raw_chat: bool = False,
        return_full_prompt: bool = False,
        apply_chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        files = normalise_data_files(data_files)
        if (
            isinstance(max_prompt_length, bool)
            or not isinstance(max_prompt_length, int)
            or max_prompt_length <= 0
        ):
            raise ConfigError(f"max_prompt_length must be a positive int, got {max_prompt_length!r}")
        if truncation not in TRUNCATION_MODES:
            raise ConfigError(
                f"truncation={truncation!r} is not supported; use one of {list(TRUNCATION_MODES)}"
            )
        if not isinstance(prompt_key, str) or not prompt_key:
            raise TypeError(f"prompt_key must be a non-empty str, got {prompt_key!r}")
        if (
            isinstance(max_samples, bool)
            or not isinstance(max_samples, int)
            or not (max_samples == -1 or max_samples > 0)
        ):
            raise ConfigError(f"max_samples must be -1 (all rows) or a positive int, got {max_samples!r}")
        workers = filter_overlong_prompts_workers
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"filter_overlong_prompts_workers must be an int >= 1, got {workers!r}")
        if getattr(tokenizer, "pad_token_id", None) is None:
            raise ConfigError(
                "tokenizer has no pad token; set tokenizer.pad_token (for example to its eos_token)"
            )

        self.data_files = files
        self.tokenizer = tokenizer
        self.prompt_key = prompt_key
        self.max_prompt_length = max_prompt_length
        self.truncation = truncation
        self.filter_overlong_prompts = filter_overlong_prompts
        self.filter_overlong_prompts_workers = workers
        self.max_samples = max_samples
        self.return_raw_chat = return_raw_chat
        self.return_full_prompt = return_full_prompt
        self.apply_chat_template_kwargs = dict(apply_chat_template_kwargs or {})
        self.pad_token_id = int(tokenizer.pad_token_id)

        prompts: list[Any] = []
        data_sources: list[Any] = []
        reward_models: list[Any] = []
        extra_infos: list[Any] = []
        # file_starts[k] is the global row number of file k's first row (for error messages).
        file_starts: list[int] = []
        for path in files:
            columns = read_data_file(
                path,
                [prompt_key],
                ["data_source", "reward_model", "extra_info"],
                key_names={prompt_key: "data.prompt_key"},
            )
            file_starts.append(len(prompts))
            prompts.extend(columns[prompt_key])
            data_sources.extend(columns["data_source"])
            reward_models.extend(columns["reward_model"])
            extra_infos.extend(columns["extra_info"])
        if not prompts:
            raise DataError(f"data files {files} contain no rows")
        self._file_starts = file_starts

        kept, flat_ids, lengths, texts, examined = self._tokenize_and_filter(prompts)
        self.num_dropped = examined - len(kept)
        # Kept rows' tokens live in one flat int32 tensor (row j spans _starts[j] : _starts[j] +
        # _lengths[j]): one allocation, half the size of int64, instead of a list per prompt.
        self._flat_ids = flat_ids
        self._lengths = lengths
        self._starts = torch.cumsum(lengths, dim=0) - lengths
        self._index = kept
        self._prompts = [prompts[i] for i in kept]
        self._data_sources = [data_sources[i] for i in kept]
        self._reward_models = [reward_models[i] for i in kept]
        self._extra_infos = [extra_infos[i] for i in kept]
        self._full_prompts = texts if return_full_prompt else None

    def _locate(self, row: int) -> tuple[int, str]:
        """(row number within its file, file path) of a global row number."""
        k = bisect.bisect_right(self._file_starts, row) - 1
        return row - self._file_starts[k], self.data_files[k]

    def _where(self, row: int) -> str:
        local, path = self._locate(row)
        return f"row {local} of {path!r}"

    def describe_row(self, i: int) -> str:
        """Where item ``i`` comes from: ``row N of 'file'`` (for error messages)."""
        return self._where(self._index[i])

    def _encode_checked(
        self, encoder: ChatEncoder, start: int, chunk: Sequence[Any]
    ) -> tuple[list[str], list[list[int]]]:
        """Validate a chunk's messages (naming the row on error), then render and tokenise it."""
        for offset, messages in enumerate(chunk):
            if not is_chat_messages(messages):
                raise DataError(
                    f"{self._where(start + offset)}: column {self.prompt_key!r} must be a non-empty "
                    f"list of {{'role': str, 'content': str}} messages, got {messages!r:.200}"
                )
        return encoder(list(chunk))

    def _tokenize_and_filter(
        self, prompts: list[Any]
    ) -> tuple[list[int], torch.Tensor, torch.Tensor, list[str], int]:
        """Tokenise chunk by chunk, keeping rows that pass the length filter, up to max_samples.

        Returns (kept global row numbers, their ids concatenated (int32), their lengths (long),
        their rendered texts (empty unless return_full_prompt), number of rows examined).
        """
        encoder = ChatEncoder(self.tokenizer, self.apply_chat_template_kwargs)
        limit = self.max_samples if self.max_samples > 0 else len(prompts)
        max_len = self.max_prompt_length
        kept: list[int] = []
        id_chunks: list[np.ndarray] = []
        lengths: list[int] = []
        kept_texts: list[str] = []
        examined = 0
        shortest_dropped: int | None = None
        chunks = iter_chunk_results(
            functools.partial(self._encode_checked, encoder),
            prompts,
            _TOKENIZE_CHUNK,
            self.filter_overlong_prompts_workers,
        )
        try:
            for start, (texts, ids) in chunks:
                chunk_ids: list[list[int]] = []
                for offset, row_ids in enumerate(ids):
                    if len(kept) >= limit:
                        break
                    examined += 1
                    n = len(row_ids)
                    if n > max_len:
                        if self.filter_overlong_prompts:
                            shortest_dropped = n if shortest_dropped is None else min(shortest_dropped, n)
                            continue
                        if self.truncation == "error":
                            local, path = self._locate(start + offset)
                            raise DataError(
                                f"row {local} has a {n}-token prompt, longer than "
                                f"max_prompt_length={max_len} (file {path!r}); raise "
                                "data.max_prompt_length, set data.filter_overlong_prompts=true, or set "
                                "data.truncation to left/right/middle"
                            )
                    kept.append(start + offset)
                    chunk_ids.append(row_ids)
                    lengths.append(n)
                    if self.return_full_prompt:
                        kept_texts.append(texts[offset])
                # Packing each chunk right away frees its Python int lists before the next one.
                count = sum(len(r) for r in chunk_ids)
                id_chunks.append(
                    np.fromiter(itertools.chain.from_iterable(chunk_ids), dtype=np.int32, count=count)
                )
                if len(kept) >= limit:
                    break
        finally:
            chunks.close()
        if not kept:
            raise DataError(
                f"all {examined} rows were dropped because every prompt is longer than "
                f"max_prompt_length={max_len} tokens (shortest: {shortest_dropped}); "
                "raise data.max_prompt_length"
            )
        flat = torch.from_numpy(np.concatenate(id_chunks))
        return kept, flat, torch.tensor(lengths, dtype=torch.long), kept_texts, examined

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"RLHFDataset index {i} out of range for {len(self)} rows")
        start = int(self._starts[i])
        ids = self._flat_ids[start : start + int(self._lengths[i])].long()
        input_ids, attention_mask = postprocess_data(
            ids.unsqueeze(0),
            torch.ones_like(ids).unsqueeze(0),
            max_length=self.max_prompt_length,
            pad_token_id=self.pad_token_id,
            left_pad=True,
            truncation=self.truncation,
        )
        input_ids, attention_mask = input_ids[0], attention_mask[0]
        extra_info = self._extra_infos[i]
        tools_kwargs = extra_info.get("tools_kwargs") if isinstance(extra_info, Mapping) else None
        item = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": compute_position_ids(attention_mask),
            # The real tokens that survived truncation, without padding.
            "raw_prompt_ids": input_ids[attention_mask.bool()].tolist(),
            "data_source": self._data_sources[i],
            "reward_model": self._reward_models[i],
            "extra_info": extra_info,
            "index": self._index[i],
            # Parquet stores a key that only some rows have as null in the others.
            "tools_kwargs": tools_kwargs if tools_kwargs is not None else {},
        }
        if self.return_raw_chat:
            item["raw_prompt"] = self._prompts[i]
        if self._full_prompts is not None:
            item["full_prompts"] = self._full_prompts[i]
        return item


def collate_fn(rows: list[dict[str, Any]]) -> BatchedDataDict:
    """Batch dataset items: tensors are stacked on a new dim 0, everything else becomes a list."""
    if not rows:
        raise ValueError("collate_fn: rows is empty; need at least one dataset item")
    keys = list(rows[0])
    for n, row in enumerate(rows):
        if list(row) != keys:
            raise ValueError(f"collate_fn: row {n} has keys {sorted(row)}, expected {sorted(keys)}")
    batch: dict[str, Any] = {}
    for key in keys:
        values = [row[key] for row in rows]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return BatchedDataDict(batch)
