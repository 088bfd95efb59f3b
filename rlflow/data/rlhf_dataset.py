"""Prompt dataset for RL: parquet rows in verl's schema -> left-padded prompt token tensors.

Each parquet row holds ``prompt`` (chat messages ``[{"role": ..., "content": ...}, ...]``),
``data_source``, ``reward_model`` (``{"style", "ground_truth"}``) and ``extra_info``. Prompts
are rendered with the tokenizer's chat template (generation prompt appended) and tokenised
once, in batches, when the dataset is built; ``__getitem__`` only slices and pads.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from rlflow.data.batched_data_dict import BatchedDataDict
from rlflow.utils.torch_functional import TRUNCATION_MODES, compute_position_ids, postprocess_data

# Conversations rendered and tokenised per call: big enough that the fast tokenizer batches
# efficiently, small enough that the intermediate Python lists of ids stay bounded.
_TOKENIZE_CHUNK = 8192


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read_parquet_columns(path: str, prompt_key: str) -> dict[str, list[Any]]:
    """Read the columns the dataset uses from one parquet file as Python lists."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} not found; check data.train_files / data.val_files")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"cannot read data file {path!r} as parquet: {_first_line(exc)}") from exc
    if prompt_key not in table.column_names:
        raise ValueError(
            f"data file {path!r} has no column {prompt_key!r} (columns: {table.column_names}); "
            "set data.prompt_key to the column holding the chat messages"
        )
    num_rows = table.num_rows
    columns: dict[str, list[Any]] = {"prompt": table.column(prompt_key).to_pylist()}
    # Optional columns: a prompt-only file still loads; scoring it needs a data_source later.
    for name, default in (("data_source", None), ("reward_model", None), ("extra_info", None)):
        if name in table.column_names:
            columns[name] = table.column(name).to_pylist()
        else:
            columns[name] = [default] * num_rows
    return columns


def _check_messages(messages: Any, row: int, path: str, prompt_key: str) -> None:
    ok = isinstance(messages, list) and len(messages) > 0 and all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    )
    if not ok:
        raise ValueError(
            f"row {row} of {path!r}: column {prompt_key!r} must be a non-empty list of "
            f"{{'role': str, 'content': str}} messages, got {messages!r:.200}"
        )


class RLHFDataset(Dataset):
    """Tokenised prompts from one or more parquet files (rows concatenated in file order).

    Args:
        data_files: a parquet path or a list of them (``demo:`` paths are resolved).
        tokenizer: a Hugging Face tokenizer with a chat template and a pad token.
        prompt_key: column holding the chat messages.
        max_prompt_length: width of the padded ``input_ids``.
        truncation: ``left | right | middle | error`` for prompts longer than
            ``max_prompt_length`` (only reachable when ``filter_overlong_prompts`` is False;
            with ``error`` such a prompt fails here, at construction).
        filter_overlong_prompts: drop prompts longer than ``max_prompt_length``
            (``num_dropped`` counts them).
        return_raw_chat: also return the messages as ``raw_prompt``.
        apply_chat_template_kwargs: extra keyword arguments for ``apply_chat_template``.

    ``self[i]`` is a dict with ``input_ids``, ``attention_mask``, ``position_ids`` (1-D long,
    length ``max_prompt_length``, left padded), ``raw_prompt_ids`` (list of unpadded ids,
    truncated like ``input_ids``), ``data_source``, ``reward_model``, ``extra_info``, ``index``
    (row position across the files before filtering) and, if asked, ``raw_prompt``.
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
        return_raw_chat: bool = False,
        apply_chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        files = self._normalise_files(data_files)
        if isinstance(max_prompt_length, bool) or not isinstance(max_prompt_length, int) or max_prompt_length <= 0:
            raise ValueError(f"max_prompt_length must be a positive int, got {max_prompt_length!r}")
        if truncation not in TRUNCATION_MODES:
            raise ValueError(f"truncation={truncation!r} is not supported; use one of {list(TRUNCATION_MODES)}")
        if not isinstance(prompt_key, str) or not prompt_key:
            raise TypeError(f"prompt_key must be a non-empty str, got {prompt_key!r}")
        if getattr(tokenizer, "pad_token_id", None) is None:
            raise ValueError(
                "tokenizer has no pad token; set tokenizer.pad_token (for example to its eos_token)"
            )

        self.data_files = files
        self.tokenizer = tokenizer
        self.prompt_key = prompt_key
        self.max_prompt_length = max_prompt_length
        self.truncation = truncation
        self.filter_overlong_prompts = filter_overlong_prompts
        self.return_raw_chat = return_raw_chat
        self.apply_chat_template_kwargs = dict(apply_chat_template_kwargs or {})
        self.pad_token_id = int(tokenizer.pad_token_id)

        prompts: list[list[dict[str, Any]]] = []
        data_sources: list[Any] = []
        reward_models: list[Any] = []
        extra_infos: list[Any] = []
        for path in files:
            columns = _read_parquet_columns(path, prompt_key)
            for row, messages in enumerate(columns["prompt"]):
                _check_messages(messages, row, path, prompt_key)
            prompts.extend(columns["prompt"])
            data_sources.extend(columns["data_source"])
            reward_models.extend(columns["reward_model"])
            extra_infos.extend(columns["extra_info"])
        if not prompts:
            raise ValueError(f"data files {files} contain no rows")

        flat_ids, lengths = self._tokenize(prompts)
        total = len(prompts)
        too_long = lengths > max_prompt_length
        if filter_overlong_prompts:
            keep = torch.nonzero(~too_long).flatten()
            if keep.numel() == 0:
                raise ValueError(
                    f"all {total} rows were dropped because every prompt is longer than "
                    f"max_prompt_length={max_prompt_length} tokens (shortest: {int(lengths.min())}); "
                    "raise data.max_prompt_length"
                )
        else:
            if truncation == "error" and bool(too_long.any()):
                first = int(torch.nonzero(too_long)[0])
                raise ValueError(
                    f"row {first} has a {int(lengths[first])}-token prompt, longer than "
                    f"max_prompt_length={max_prompt_length}; raise data.max_prompt_length, set "
                    "data.filter_overlong_prompts=true, or set data.truncation to left/right/middle"
                )
            keep = torch.arange(total)
        self.num_dropped = total - keep.numel()

        offsets = torch.zeros(total + 1, dtype=torch.long)
        torch.cumsum(lengths, dim=0, out=offsets[1:])
        kept = keep.tolist()
        # Kept rows' tokens stay in one flat tensor; row j spans _starts[j] : _starts[j] + _lengths[j].
        self._flat_ids = flat_ids
        self._starts = offsets[keep]
        self._lengths = lengths[keep]
        self._index = kept
        self._prompts = [prompts[i] for i in kept]
        self._data_sources = [data_sources[i] for i in kept]
        self._reward_models = [reward_models[i] for i in kept]
        self._extra_infos = [extra_infos[i] for i in kept]

    @staticmethod
    def _normalise_files(data_files: Any) -> list[str]:
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
            raise ValueError("data_files is empty; give at least one parquet file")
        return files

    def _tokenize(self, prompts: list[list[dict[str, Any]]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Render and tokenise all prompts; return (flat ids (N_tokens,), lengths (N,))."""
        chunks: list[torch.Tensor] = []
        lengths: list[int] = []
        for start in range(0, len(prompts), _TOKENIZE_CHUNK):
            batch = prompts[start : start + _TOKENIZE_CHUNK]
            try:
                texts = self.tokenizer.apply_chat_template(
                    batch, tokenize=False, add_generation_prompt=True, **self.apply_chat_template_kwargs
                )
            except ValueError as exc:
                raise ValueError(
                    f"cannot render prompts with the tokenizer's chat template: {_first_line(exc)}"
                ) from exc
            ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
            lengths.extend(len(row) for row in ids)
            chunks.append(torch.tensor([t for row in ids for t in row], dtype=torch.long))
        return torch.cat(chunks), torch.tensor(lengths, dtype=torch.long)

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"RLHFDataset index {i} out of range for {len(self)} rows")
        start = int(self._starts[i])
        ids = self._flat_ids[start : start + int(self._lengths[i])]
        input_ids, attention_mask = postprocess_data(
            ids.unsqueeze(0),
            torch.ones_like(ids).unsqueeze(0),
            max_length=self.max_prompt_length,
            pad_token_id=self.pad_token_id,
            left_pad=True,
            truncation=self.truncation,
        )
        input_ids, attention_mask = input_ids[0], attention_mask[0]
        item = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": compute_position_ids(attention_mask),
            # The real tokens that survived truncation, without padding.
            "raw_prompt_ids": input_ids[attention_mask.bool()].tolist(),
            "data_source": self._data_sources[i],
            "reward_model": self._reward_models[i],
            "extra_info": self._extra_infos[i],
            "index": self._index[i],
        }
        if self.return_raw_chat:
            item["raw_prompt"] = self._prompts[i]
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
