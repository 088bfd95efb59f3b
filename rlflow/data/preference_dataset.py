"""Preference pairs for DPO: (prompt, chosen, rejected) rows -> token ids with answer loss masks.

Row formats (``.parquet`` or ``.jsonl``, one pair per row):

* ``prompt``: a string, used verbatim (it must already hold any chat markup and BOS it
  needs), or chat messages ``[{"role", "content"}, ...]``, rendered with the tokenizer's chat
  template and ``add_generation_prompt=True``.
* ``chosen`` / ``rejected``: a string, one assistant message ``{"role": "assistant",
  "content": ...}`` (bare or in a one-element list), or a full conversation whose last message
  is the assistant answer; the messages before it must equal the prompt's messages.

Tokenisation: the prompt and each answer are tokenised separately (no special tokens added)
and concatenated, so the prompt tokens are identical in both sequences of a pair and no token
straddles the prompt/answer boundary. ``eos_token`` is appended to every answer.

Truncation policy, per pair (``L = max_length``, ``Lp = max_prompt_length``): when
``len(prompt) + max(len(chosen), len(rejected)) > L``

1. the prompt is cut to at most ``Lp`` tokens, dropping tokens from the left (``"left"``,
   the default, keeps the end of the prompt next to the answer) or from the right;
2. each answer is cut from the right to ``L - len(prompt)`` tokens (which can drop its EOS).

The prompt cut is decided by the longer answer, so chosen and rejected keep the same prompt
tokens. ``Lp < L`` is required, so at least one answer token always survives.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from rlflow.data.batched_data_dict import BatchedDataDict
from rlflow.data.rlhf_dataset import ChatEncoder, normalise_data_files, read_data_file
from rlflow.errors import ConfigError, DataError
from rlflow.utils.torch_functional import compute_position_ids, pad_2d_list_to_tensor

PROMPT_TRUNCATION_MODES = ("left", "right")


def _is_message(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and isinstance(value.get("role"), str)
        and isinstance(value.get("content"), str)
    )


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(_is_message(m) for m in value)


def _plain(messages: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    # Parquet fills keys that other rows have with None; compare what matters.
    return [(m["role"], m["content"]) for m in messages]


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
    return value


def truncate_pair(
    prompt: list[int],
    chosen: list[int],
    rejected: list[int],
    max_length: int,
    max_prompt_length: int,
    prompt_truncation: str = "left",
) -> tuple[list[int], list[int], list[int]]:
    """Apply the module's truncation policy to one pair of token lists (see module docstring)."""
    if len(prompt) + max(len(chosen), len(rejected)) <= max_length:
        return prompt, chosen, rejected
    if len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:] if prompt_truncation == "left" else prompt[:max_prompt_length]
    budget = max_length - len(prompt)
    return prompt, chosen[:budget], rejected[:budget]


class PreferenceDataset(Dataset):
    """Tokenised preference pairs from one or more ``.parquet`` / ``.jsonl`` files.

    Args:
        files: a path or a list of paths (``demo:`` paths resolved); rows concatenated in order.
        tokenizer: a Hugging Face tokenizer with an ``eos_token`` (and a chat template when
            prompts are messages).
        prompt_key, chosen_key, rejected_key: column names.
        max_length: longest prompt + answer sequence, in tokens.
        max_prompt_length: longest prompt kept when a pair must be truncated (``< max_length``).
        prompt_truncation: ``"left"`` (drop the prompt's first tokens) or ``"right"``.
        apply_chat_template_kwargs: extra keyword arguments for ``apply_chat_template``.

    ``self[i]`` holds, for ``side`` in ``chosen`` / ``rejected``: ``{side}_input_ids`` (1-D
    long, prompt + answer, unpadded), ``{side}_attention_mask`` (all ones, same length),
    ``{side}_loss_mask`` (0 on prompt tokens, 1 on answer tokens including the appended EOS);
    plus ``prompt_length`` (int, after truncation) and ``index`` (row position across files).
    Batch items with ``collate_preference`` (or ``self.collate``).
    """

    def __init__(
        self,
        files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        tokenizer: Any,
        *,
        prompt_key: str = "prompt",
        chosen_key: str = "chosen",
        rejected_key: str = "rejected",
        max_length: int,
        max_prompt_length: int,
        prompt_truncation: str = "left",
        apply_chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        paths = normalise_data_files(files)
        _check_positive_int("max_length", max_length)
        _check_positive_int("max_prompt_length", max_prompt_length)
        if max_prompt_length >= max_length:
            raise ConfigError(
                f"max_prompt_length={max_prompt_length} must be smaller than max_length={max_length} "
                "so that truncated pairs keep at least one answer token"
            )
        if prompt_truncation not in PROMPT_TRUNCATION_MODES:
            raise ConfigError(
                f"prompt_truncation={prompt_truncation!r} is not supported; use one of {list(PROMPT_TRUNCATION_MODES)}"
            )
        keys = {"prompt_key": prompt_key, "chosen_key": chosen_key, "rejected_key": rejected_key}
        for arg, key in keys.items():
            if not isinstance(key, str) or not key:
                raise TypeError(f"{arg} must be a non-empty str, got {key!r}")
        if len(set(keys.values())) != 3:
            raise ConfigError(f"prompt_key, chosen_key and rejected_key must differ, got {keys}")
        if getattr(tokenizer, "eos_token_id", None) is None:
            raise ConfigError("tokenizer has no eos_token; set tokenizer.eos_token (it ends every answer)")
        if getattr(tokenizer, "pad_token_id", None) is None:
            raise ConfigError(
                "tokenizer has no pad token; set tokenizer.pad_token (for example to its eos_token)"
            )

        self.files = paths
        self.tokenizer = tokenizer
        self.prompt_key, self.chosen_key, self.rejected_key = prompt_key, chosen_key, rejected_key
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.prompt_truncation = prompt_truncation
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.eos_token_id = int(tokenizer.eos_token_id)

        prompts: list[Any] = []
        answers: dict[str, list[str]] = {"chosen": [], "rejected": []}
        for path in paths:
            columns = read_data_file(
                path,
                [prompt_key, chosen_key, rejected_key],
                key_names={prompt_key: "prompt_key", chosen_key: "chosen_key", rejected_key: "rejected_key"},
            )
            for row, prompt in enumerate(columns[prompt_key]):
                where = f"row {row} of {path!r}"
                if not (isinstance(prompt, str) or _is_conversation(prompt)):
                    raise DataError(
                        f"{where}: column {prompt_key!r} must be a string or a non-empty list of "
                        f"{{'role': str, 'content': str}} messages, got {prompt!r:.200}"
                    )
                prompts.append(prompt)
                for side, key in (("chosen", chosen_key), ("rejected", rejected_key)):
                    answers[side].append(self._answer_text(columns[key][row], prompt, key, where))
        if not prompts:
            raise DataError(f"data files {paths} contain no rows")

        encoder = ChatEncoder(tokenizer, apply_chat_template_kwargs)
        prompt_ids = self._encode_prompts(encoder, prompts)
        chosen_ids = encoder.encode(answers["chosen"])
        rejected_ids = encoder.encode(answers["rejected"])

        self._rows: list[tuple[list[int], list[int], list[int]]] = []
        for p, c, r in zip(prompt_ids, chosen_ids, rejected_ids, strict=True):
            self._rows.append(
                truncate_pair(
                    list(p),
                    [*c, self.eos_token_id],
                    [*r, self.eos_token_id],
                    max_length,
                    max_prompt_length,
                    prompt_truncation,
                )
            )

    @staticmethod
    def _answer_text(value: Any, prompt: Any, key: str, where: str) -> str:
        """The answer string of one chosen/rejected cell (format rules in the module docstring)."""
        if isinstance(value, str):
            text = value
        elif _is_message(value):
            if value["role"] != "assistant":
                raise DataError(
                    f"{where}: column {key!r} holds a {value['role']!r} message; "
                    "the answer must be an assistant message"
                )
            text = value["content"]
        elif _is_conversation(value):
            last, earlier = value[-1], value[:-1]
            if last["role"] != "assistant":
                raise DataError(
                    f"{where}: column {key!r} is a conversation ending with a {last['role']!r} message; "
                    "its last message must be the assistant answer"
                )
            if earlier and (isinstance(prompt, str) or _plain(earlier) != _plain(prompt)):
                raise DataError(
                    f"{where}: column {key!r} is a conversation whose messages before the answer differ "
                    "from the prompt; give only the answer, or the prompt's messages followed by it"
                )
            text = last["content"]
        else:
            raise DataError(
                f"{where}: column {key!r} must be a string, an assistant message or a conversation, "
                f"got {value!r:.200}"
            )
        if not text.strip():
            raise DataError(
                f"{where}: column {key!r} has an empty answer; remove the row or fill in the answer"
            )
        return text

    @staticmethod
    def _encode_prompts(encoder: ChatEncoder, prompts: list[Any]) -> list[list[int]]:
        """Token ids of every prompt; message prompts are rendered in one batch."""
        texts: list[str] = [p if isinstance(p, str) else "" for p in prompts]
        chat_rows = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if chat_rows:
            rendered = encoder.render([prompts[i] for i in chat_rows])
            for i, text in zip(chat_rows, rendered, strict=True):
                texts[i] = text
        return encoder.encode(texts)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"PreferenceDataset index {i} out of range for {len(self)} rows")
        prompt, chosen, rejected = self._rows[i]
        item: dict[str, Any] = {}
        for side, answer in (("chosen", chosen), ("rejected", rejected)):
            ids = torch.tensor(prompt + answer, dtype=torch.long)
            loss_mask = torch.zeros_like(ids)
            loss_mask[len(prompt) :] = 1
            item[f"{side}_input_ids"] = ids
            item[f"{side}_attention_mask"] = torch.ones_like(ids)
            item[f"{side}_loss_mask"] = loss_mask
        item["prompt_length"] = len(prompt)
        item["index"] = i if i >= 0 else len(self) + i
        return item

    def collate(self, items: list[dict[str, Any]]) -> BatchedDataDict:
        """``collate_preference`` with this dataset's pad token."""
        return collate_preference(items, self.pad_token_id)


def collate_preference(
    items: list[dict[str, Any]], pad_token_id: int, pad_to_multiple_of: int = 1
) -> BatchedDataDict:
    """Batch preference items into one ``BatchedDataDict`` of ``2 * B`` right-padded rows.

    Layout: interleaved, row ``2k`` is pair ``k``'s chosen sequence and row ``2k + 1`` its
    rejected one. Contiguous slicing (``chunk``, ``shard_by_batch_size`` without dynamic
    batching, even-sized micro-batches) therefore never separates a pair, and a loss recovers
    the sides with ``x.view(B, 2)[:, 0]`` (chosen) and ``[:, 1]`` (rejected).

    Keys: ``input_ids``, ``attention_mask``, ``loss_mask``, ``position_ids`` (``[2B, T]``, T the
    longest sequence rounded up to ``pad_to_multiple_of``; padding has id ``pad_token_id`` and
    masks 0), ``prompt_lengths`` and ``input_lengths`` (``[2B]`` long), ``is_chosen``
    (``[2B]`` bool) and ``index`` (list of 2B dataset row positions). A DPO loss sums the
    per-token log-probs of ``input_ids[:, 1:]`` over ``loss_mask[:, 1:]`` for each row.
    """
    if not items:
        raise ValueError("collate_preference: items is empty; need at least one preference item")
    if (
        isinstance(pad_to_multiple_of, bool)
        or not isinstance(pad_to_multiple_of, int)
        or pad_to_multiple_of < 1
    ):
        raise ValueError(
            f"collate_preference: pad_to_multiple_of must be an int >= 1, got {pad_to_multiple_of!r}"
        )
    ids, masks, prompt_lengths, index = [], [], [], []
    for n, item in enumerate(items):
        for side in ("chosen", "rejected"):
            for key in (f"{side}_input_ids", f"{side}_loss_mask"):
                if key not in item:
                    raise ValueError(
                        f"collate_preference: item {n} has no {key!r}; pass PreferenceDataset items"
                    )
            ids.append(item[f"{side}_input_ids"])
            masks.append(item[f"{side}_loss_mask"])
            prompt_lengths.append(int(item["prompt_length"]))
            index.append(item.get("index", n))
    lengths = [len(x) for x in ids]
    width = -(-max(lengths) // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = pad_2d_list_to_tensor(ids, pad_token_id, max_length=width)
    attention_mask = pad_2d_list_to_tensor(
        [torch.ones(n, dtype=torch.long) for n in lengths], 0, max_length=width
    )
    return BatchedDataDict(
        {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "loss_mask": pad_2d_list_to_tensor(masks, 0, max_length=width),
            "position_ids": compute_position_ids(attention_mask),
            "prompt_lengths": torch.tensor(prompt_lengths, dtype=torch.long),
            "input_lengths": torch.tensor(lengths, dtype=torch.long),
            "is_chosen": torch.tensor([k % 2 == 0 for k in range(len(ids))]),
            "index": index,
        }
    )
