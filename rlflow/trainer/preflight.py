"""Checks the driver makes on the user's files before Ray or any worker starts.

``check_config`` (``rlflow.trainer.config_checks``) covers the values; this module opens the
files they point to, cheaply: the model folders (``config.json``, the safetensors headers,
never the weights), the tokenizer, the reward code and the first rows of data. Each failure is
one ``ConfigError`` / ``RewardError`` line naming the key or file and the fix, within seconds,
instead of a worker constructor's traceback minutes later.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional

from omegaconf import DictConfig

from rlflow.errors import ConfigError, RewardError
from rlflow.models.loading import load_tokenizer, resolve_model_path
from rlflow.rewards.combine import resolve_reward_fn
from rlflow.rewards.contract import check_signature, row_problem

# A safetensors file starts with the length of its JSON header (8 bytes, little endian);
# anything larger than this is not a header but garbage.
_MAX_HEADER_BYTES = 100 * 2**20


def preflight(cfg: DictConfig, *, reward_fn: Optional[Callable[..., Any]] = None) -> Any:
    """Check the model folder(s), the tokenizer and (for RL) the reward function; return the
    loaded tokenizer. ``reward_fn`` is a Python scoring function standing in for ``reward.*``."""
    check_model_folder("model.path", cfg.model.path, cfg.model.trust_remote_code)
    rl = cfg.trainer.algorithm == "rl"
    if rl and cfg.algorithm.adv_estimator == "gae" and cfg.critic.model_path:
        check_model_folder("critic.model_path", cfg.critic.model_path, cfg.model.trust_remote_code)
    key = "model.tokenizer_path" if cfg.model.tokenizer_path else "model.path"
    folder = resolve_model_path(cfg.model.tokenizer_path or cfg.model.path, key)
    try:
        tokenizer = load_tokenizer(cfg.model)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad folder
        raise ConfigError(
            f"{key}: the tokenizer in '{folder}' cannot be loaded ({_first_line(exc)}): point {key} "
            "at a folder with the tokenizer files (tokenizer.json or tokenizer_config.json + vocab)"
        ) from None
    if rl:
        check_signature(resolve_reward_fn(cfg.reward, reward_fn))
    return tokenizer


def check_first_rows(cfg: DictConfig, dataset: Any, reward_fn: Optional[Callable[..., Any]] = None) -> None:
    """Every row of the first batch must be scorable: its ``data_source`` has a scorer (when the
    built-in registry scores) and its ground truth is set (unless the scorer needs none)."""
    fn = resolve_reward_fn(cfg.reward, reward_fn)
    for i in range(min(len(dataset), cfg.data.train_batch_size)):
        row = dataset[i]
        if not isinstance(row, dict):
            return  # a custom dataset with its own row type: the reward worker checks it
        truth = (row.get("reward_model") or {}).get("ground_truth")
        problem = row_problem(fn, row.get("data_source"), truth)
        if problem is not None:
            where = dataset.describe_row(i) if hasattr(dataset, "describe_row") else f"data row {i}"
            raise RewardError(f"{where}: {problem}")


def check_model_folder(key: str, path: str, trust_remote_code: bool = False) -> str:
    """A Hugging Face model folder: a readable config and complete safetensors weights."""
    from transformers import AutoConfig

    folder = resolve_model_path(path, key)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ConfigError(
            f"{key} '{path}' has no config.json: point {key} at a Hugging Face model folder "
            "(what save_pretrained writes)"
        )
    try:
        AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - a broken or unknown config, whatever the type
        raise ConfigError(
            f"{key}: '{os.path.join(folder, 'config.json')}' cannot be read ({_first_line(exc)}): "
            "fix or re-save the model folder"
        ) from None
    for weights in _weight_files(key, folder):
        check_safetensors(key, weights)
    return folder


def _weight_files(key: str, folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            names = sorted(set(json.load(f).get("weight_map", {}).values()))
        missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
        if missing:
            raise ConfigError(
                f"{key}: '{index}' lists weight files that are missing ({', '.join(missing[:3])}): "
                "copy the whole model folder"
            )
    else:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not names:
        raise ConfigError(
            f"{key}: '{folder}' has no *.safetensors weights: save the model with "
            "save_pretrained (safetensors is the default)"
        )
    return [os.path.join(folder, n) for n in names]


def check_safetensors(key: str, path: str) -> None:
    """Read only the header of a safetensors file and check that the file holds every byte
    its tensors need (a truncated copy or a corrupt file fails here, not in a worker)."""
    size = os.path.getsize(path)
    reason = None
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else None
        if length is None or length > min(size - 8, _MAX_HEADER_BYTES):
            reason = "no valid header"
        else:
            try:
                header = json.loads(f.read(length))
                end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                reason = "unreadable header"
            else:
                if end > size - 8 - length:
                    reason = f"truncated: its tensors need {end} bytes of data, it holds {size - 8 - length}"
    if reason is not None:
        raise ConfigError(
            f"{key}: weights file '{path}' is not a complete safetensors file ({reason}): copy or "
            "save the model again"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
