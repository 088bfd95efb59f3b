"""DataPacker: the hook that turns a user's dataset rows into rollout and policy inputs.

Three hand-offs happen per step, and a packer owns the two that depend on the data format:

1. dataset row -> rollout input: ``get_rollout_input(row)`` per row, then
   ``rollout_collate_fn(items)`` for the batch the rollout group generates from;
2. (row, completion text) -> policy input: ``get_policy_input(row, completion)`` per
   sample, then ``policy_collate_fn(items)`` for the batch the actor trains on.

A row is one dataset item as a mapping (for rlflow's parquet schema: ``prompt``,
``data_source``, ``reward_model``, ``extra_info``). ``ChatDataPacker`` is the default and
reproduces ``RLHFDataset`` + ``collate_fn`` exactly; subclass ``DataPacker`` for other row
formats (multi-modal rows, prompts assembled from several columns, tool schemas ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from rlflow.data.batched_data_dict import BatchedDataDict
from rlflow.data.rlhf_dataset import ChatEncoder, is_chat_messages
from rlflow.errors import ConfigError, DataError
from rlflow.utils.torch_functional import (
    TRUNCATION_MODES,
    compute_position_ids,
    get_response_mask,
    pad_2d_list_to_tensor,
    postprocess_data,
    response_batch,
)


def _config_get(config: Any, *path: str) -> Any:
    """``config.a.b`` for dicts, OmegaConf configs and attribute objects; None when absent."""
    node = config
    for key in path:
        if node is None:
            return None
        if isinstance(node, Mapping):
            node = node.get(key)
        else:
            node = getattr(node, key, None)
    return node


class DataPacker:
    """Base class for data-format hooks (see the module docstring for the data flow).

    ``setup(config, tokenizer)`` is called once, before any other method, by whoever builds
    the packer (``resolve_packer``); subclasses that need more state override it and call
    ``super().setup``. The four conversion methods must be implemented by subclasses.
    """

    config: Any = None
    tokenizer: Any = None

    def setup(self, config: Any, tokenizer: Any) -> None:
        """Keep the run's config (``None`` allowed) and tokenizer for the conversion methods."""
        self.config = config
        self.tokenizer = tokenizer

    def get_rollout_input(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """One dataset row -> what the rollout needs for it (e.g. the chat messages)."""
        raise NotImplementedError(f"{type(self).__name__} must implement get_rollout_input(row)")

    def rollout_collate_fn(self, items: list[dict[str, Any]]) -> BatchedDataDict:
        """A list of ``get_rollout_input`` results -> the batch handed to the rollout group."""
        raise NotImplementedError(f"{type(self).__name__} must implement rollout_collate_fn(items)")

    def get_policy_input(self, row: Mapping[str, Any], completion: str) -> dict[str, Any]:
        """One dataset row and one generated completion -> what the policy trains on."""
        raise NotImplementedError(f"{type(self).__name__} must implement get_policy_input(row, completion)")

    def policy_collate_fn(self, items: list[dict[str, Any]]) -> BatchedDataDict:
        """A list of ``get_policy_input`` results -> the batch handed to the actor group."""
        raise NotImplementedError(f"{type(self).__name__} must implement policy_collate_fn(items)")


class ChatDataPacker(DataPacker):
    """Default packer for chat-message prompts, matching ``RLHFDataset`` + ``collate_fn``.

    Settings come from the constructor or, for those left as ``None``, from ``config.data``
    at ``setup`` (``prompt_key``, ``max_prompt_length``, ``max_response_length``,
    ``truncation``, ``apply_chat_template_kwargs``), with ``RLHFDataset``'s defaults last.

    Rollout items: ``raw_prompt`` (the messages), ``raw_prompt_ids`` (rendered with the chat
    template and generation prompt, truncated to ``max_prompt_length`` like ``RLHFDataset``),
    ``data_source``, ``reward_model``, ``extra_info``, ``tools_kwargs``. The rollout batch adds
    left-padded ``input_ids`` / ``attention_mask`` / ``position_ids`` ``[B, max_prompt_length]``
    and keeps the rest as lists.

    Policy items: ``prompt_ids`` as above and ``response_ids``, the completion re-tokenised
    (no special tokens added) and cut to ``max_response_length``. The completion must be the
    generated text decoded *without* skipping special tokens, so a finished answer still ends
    with its EOS. Re-tokenising text can differ from the sampled ids when a tokenizer has
    several spellings of a string; backends that return ids should pass those instead. The
    policy batch has the rollout output layout: ``prompts`` ``[B, P]`` (left-padded),
    ``responses`` / ``response_mask`` ``[B, R]`` (right-padded; mask 1 up to and including the
    first EOS), ``input_ids`` / ``attention_mask`` / ``position_ids`` ``[B, P + R]``.
    """

    _DEFAULTS: dict[str, Any] = {
        "prompt_key": "prompt",
        "max_prompt_length": 64,
        "max_response_length": None,
        "truncation": "error",
        "apply_chat_template_kwargs": {},
    }

    def __init__(
        self,
        tokenizer: Any = None,
        *,
        prompt_key: str | None = None,
        max_prompt_length: int | None = None,
        max_response_length: int | None = None,
        truncation: str | None = None,
        apply_chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        # Explicit arguments win over config.data at every setup(); None defers to the config.
        self._overrides = {
            "prompt_key": prompt_key,
            "max_prompt_length": max_prompt_length,
            "max_response_length": max_response_length,
            "truncation": truncation,
            "apply_chat_template_kwargs": apply_chat_template_kwargs,
        }
        self._encoder: ChatEncoder | None = None
        if tokenizer is not None:
            self.setup(None, tokenizer)

    def setup(self, config: Any, tokenizer: Any) -> None:
        super().setup(config, tokenizer)
        settings = {}
        for key, default in self._DEFAULTS.items():
            value = self._overrides[key]
            if value is None:
                value = _config_get(config, "data", key)
            settings[key] = default if value is None else value
        self.prompt_key = str(settings["prompt_key"])
        self.max_prompt_length = settings["max_prompt_length"]
        self.max_response_length = settings["max_response_length"]
        self.truncation = settings["truncation"]
        self.apply_chat_template_kwargs = dict(settings["apply_chat_template_kwargs"])
        for key in ("max_prompt_length", "max_response_length"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(f"ChatDataPacker: {key} must be a positive int, got {value!r}")
        if self.truncation not in TRUNCATION_MODES:
            raise ConfigError(
                f"ChatDataPacker: truncation={self.truncation!r} is not supported; use one of {list(TRUNCATION_MODES)}"
            )
        if tokenizer is None or getattr(tokenizer, "pad_token_id", None) is None:
            raise ConfigError("ChatDataPacker needs a tokenizer with a pad token; set tokenizer.pad_token")
        self._encoder = ChatEncoder(tokenizer, self.apply_chat_template_kwargs)

    def _require_setup(self) -> ChatEncoder:
        if self._encoder is None:
            raise RuntimeError(
                "ChatDataPacker is not set up: pass a tokenizer or call setup(config, tokenizer) first"
            )
        return self._encoder

    def _prompt_ids(self, row: Mapping[str, Any]) -> list[int]:
        encoder = self._require_setup()
        if not isinstance(row, Mapping) or self.prompt_key not in row:
            keys = sorted(row) if isinstance(row, Mapping) else type(row).__name__
            raise DataError(f"row has no {self.prompt_key!r} key (has {keys}); set data.prompt_key")
        messages = row[self.prompt_key]
        if not is_chat_messages(messages):
            raise DataError(
                f"row[{self.prompt_key!r}] must be a non-empty list of {{'role': str, 'content': str}} "
                f"messages, got {messages!r:.200}"
            )
        _, (ids,) = encoder([messages])
        if len(ids) <= self.max_prompt_length:
            return list(ids)
        # The same truncation code as RLHFDataset, so the two paths cannot drift apart.
        ids_t = torch.tensor(ids, dtype=torch.long)
        ids_t, mask = postprocess_data(
            ids_t,
            torch.ones_like(ids_t),
            self.max_prompt_length,
            int(self.tokenizer.pad_token_id),
            left_pad=True,
            truncation=self.truncation,
        )
        return ids_t[mask.bool()].tolist()

    def get_rollout_input(self, row: Mapping[str, Any]) -> dict[str, Any]:
        ids = self._prompt_ids(row)
        extra_info = row.get("extra_info")
        tools_kwargs = extra_info.get("tools_kwargs") if isinstance(extra_info, Mapping) else None
        return {
            "raw_prompt": row[self.prompt_key],
            "raw_prompt_ids": ids,
            "data_source": row.get("data_source"),
            "reward_model": row.get("reward_model"),
            "extra_info": extra_info,
            "tools_kwargs": tools_kwargs if tools_kwargs is not None else {},
        }

    def rollout_collate_fn(self, items: list[dict[str, Any]]) -> BatchedDataDict:
        self._require_setup()
        if not items:
            raise ValueError("rollout_collate_fn: items is empty; need at least one rollout input")
        ids = [item["raw_prompt_ids"] for item in items]
        input_ids = pad_2d_list_to_tensor(
            ids, int(self.tokenizer.pad_token_id), left_pad=True, max_length=self.max_prompt_length
        )
        attention_mask = pad_2d_list_to_tensor(
            [[1] * len(x) for x in ids], 0, left_pad=True, max_length=self.max_prompt_length
        )
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": compute_position_ids(attention_mask),
        }
        for key in items[0]:
            batch[key] = [item[key] for item in items]
        return BatchedDataDict(batch)

    def get_policy_input(self, row: Mapping[str, Any], completion: str) -> dict[str, Any]:
        if not isinstance(completion, str):
            raise TypeError(
                f"get_policy_input: completion must be the generated text (str), got {type(completion).__name__}"
            )
        prompt_ids = self._prompt_ids(row)
        response_ids = self._require_setup().encode([completion])[0] if completion else []
        if self.max_response_length is not None:
            response_ids = response_ids[: self.max_response_length]
        return {"prompt_ids": prompt_ids, "response_ids": list(response_ids)}

    def policy_collate_fn(self, items: list[dict[str, Any]]) -> BatchedDataDict:
        self._require_setup()
        if not items:
            raise ValueError("policy_collate_fn: items is empty; need at least one policy input")
        pad = int(self.tokenizer.pad_token_id)
        prompt_ids = [item["prompt_ids"] for item in items]
        response_ids = [item["response_ids"] for item in items]
        width = self.max_response_length or max(1, max(len(r) for r in response_ids))
        prompts = pad_2d_list_to_tensor(prompt_ids, pad, left_pad=True, max_length=self.max_prompt_length)
        prompt_mask = pad_2d_list_to_tensor(
            [[1] * len(p) for p in prompt_ids], 0, left_pad=True, max_length=self.max_prompt_length
        )
        responses = pad_2d_list_to_tensor(response_ids, pad, max_length=width)
        # Lengths come from the items, not from scanning for pad ids, because pad may equal EOS.
        valid = pad_2d_list_to_tensor([[1] * len(r) for r in response_ids], 0, max_length=width)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        response_mask = valid if eos is None else get_response_mask(responses, int(eos)) * valid
        responses = torch.where(response_mask.bool(), responses, torch.full_like(responses, pad))
        return BatchedDataDict(response_batch(prompts, prompt_mask, responses, response_mask))
