"""Load tokenizers and causal LMs the same way for every role.

Demo paths ("demo:...") are turned into real folders first, so the demo model goes through the
same ``from_pretrained`` code path as any user model.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from rlflow.demo.assets import resolve_demo_path
from rlflow.errors import ConfigError
from rlflow.models.architecture import model_class, resolve_attn_implementation

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(path: str, key: str = "model.path") -> str:
    """The local folder of ``path`` (demo paths are created); ``key`` names it in errors."""
    resolved = resolve_demo_path(path)
    if not os.path.isdir(resolved):
        raise ConfigError(
            f"{key} '{path}' is not a folder: point {key} at a local Hugging Face model "
            f"folder (config.json + safetensors), or use demo:tiny-char-lm"
        )
    return resolved


def load_tokenizer(model_cfg: Any) -> PreTrainedTokenizerBase:
    path = resolve_model_path(model_cfg.tokenizer_path or model_cfg.path)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError(
                f"tokenizer at '{path}' has neither a pad token nor an eos token: "
                f"add a pad_token to its tokenizer_config.json"
            )
        # Common for base models; padding is always masked out, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"model.dtype '{name}' is not supported: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _is_dropout_key(key: str) -> bool:
    key = key.lower()
    return "dropout" in key or "pdrop" in key or key.endswith("layerdrop")


def load_model_config(model_cfg: Any, path: str) -> Any:
    """The transformers config of the model folder ``path``; with ``model.disable_dropout``
    every dropout probability in it is 0.

    Modules read their dropout rates from the config when built, so zeroing them here turns
    off every dropout (modules, functional calls, attention probabilities, layer drop) for
    any architecture. Training with dropout would make the update's log-probs differ from
    the rollout's and from ``compute_log_prob``, and packed or unpadded micro-batches from
    padded ones.
    """
    config = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    if getattr(model_cfg, "disable_dropout", True) is not False:  # DictConfig, dataclass or missing
        nested = [getattr(config, name, None) for name in getattr(config, "sub_configs", None) or {}]
        for sub in [config, *(c for c in nested if c is not None)]:
            for key, value in list(vars(sub).items()):
                if _is_dropout_key(key) and isinstance(value, float):
                    setattr(sub, key, 0.0)
    return config


def load_causal_lm(model_cfg: Any, device: torch.device | str = "cpu") -> torch.nn.Module:
    return load_pretrained(model_cfg, resolve_model_path(model_cfg.path), device, AutoModelForCausalLM)


def load_pretrained(model_cfg: Any, path: str, device: torch.device | str, auto_class: Any) -> torch.nn.Module:
    """The model folder ``path`` loaded with ``auto_class`` (``AutoModelForCausalLM``,
    ``AutoModel`` ...), with the attention implementation ``model.attn_implementation``
    resolves to for its class, and dropout off unless ``model.disable_dropout=false``."""
    # One "Loading weights" bar per worker per role floods the driver's console through Ray.
    hf_logging.disable_progress_bar()
    config = load_model_config(model_cfg, path)
    cls = model_class(config, base=auto_class is not AutoModelForCausalLM)
    model = auto_class.from_pretrained(
        path,
        config=config,
        dtype=torch_dtype(model_cfg.dtype),
        trust_remote_code=model_cfg.trust_remote_code,
        attn_implementation=resolve_attn_implementation(model_cfg.attn_implementation, cls),
        use_safetensors=True,
    )
    return model.to(device)
