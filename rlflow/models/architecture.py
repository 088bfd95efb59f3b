"""What rlflow needs from a model's transformers class, checked in the driver before Ray starts.

The workers load ``model.path`` with ``AutoModelForCausalLM`` (the critic with ``AutoModel``).
Whether that works with the config's attention implementation, FSDP2 sharding and sequence
packing depends only on the model's class, which the driver can look up from ``config.json``
without loading any weights. So a setting that cannot work fails here, in one line naming the
setting that does, instead of inside a worker constructor.
"""

from __future__ import annotations

from typing import Any, Optional

from rlflow.errors import ConfigError

# "auto": sdpa where the model's class supports it, else eager (what transformers itself
# falls back to); the same rule in the driver and in every worker.
ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
# The class flag that says whether a model supports each explicit implementation.
_SUPPORT_FLAGS = {
    "sdpa": "_supports_sdpa",
    "flash_attention_2": "_supports_flash_attn",
    "flash_attention_3": "_supports_flash_attn",
    "flex_attention": "_supports_flex_attn",
}
# Implementations whose packed rows keep sequences apart (see rlflow.models.packing).
PACKING_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")
# Per-layer attention kinds the eager / sdpa packed masks reproduce.
PACKING_LAYER_TYPES = ("full_attention", "sliding_attention")


def model_class(config: Any, base: bool = False) -> Optional[type]:
    """The class ``AutoModelForCausalLM`` (``base``: ``AutoModel``) builds for ``config``, or
    None when transformers has no such class for its model type (remote code, other tasks)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

    try:
        return (MODEL_MAPPING if base else MODEL_FOR_CAUSAL_LM_MAPPING)[type(config)]
    except KeyError:
        return None


def resolve_attn_implementation(setting: str, cls: Optional[type]) -> Optional[str]:
    """The attention implementation to load ``cls`` with for ``model.attn_implementation``.

    ``auto`` gives sdpa when the class supports it, else eager; None (transformers decides)
    when the class is unknown. An explicit implementation the class does not support raises
    ConfigError naming the one to use.
    """
    if setting not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(
            f"model.attn_implementation='{setting}' is not valid: use one of {', '.join(ATTN_IMPLEMENTATIONS)}"
        )
    if cls is None:
        return None if setting == "auto" else setting
    fallback = "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"
    if setting == "auto":
        return fallback
    flag = _SUPPORT_FLAGS.get(setting)
    if flag is not None and not getattr(cls, flag, False):
        raise ConfigError(
            f"model.attn_implementation={setting}: {cls.__name__} has no {setting} attention; "
            f"set model.attn_implementation={fallback} (or auto)"
        )
    return setting


def _read_config(model_cfg: Any) -> Optional[Any]:
    from transformers import AutoConfig

    from rlflow.models.loading import resolve_model_path

    try:
        return AutoConfig.from_pretrained(resolve_model_path(model_cfg.path))
    except Exception:  # noqa: BLE001 - a missing or broken model folder is reported by the loaders' checks
        return None


def _check_shardable(cls: type, role: str, num_workers: int) -> None:
    if num_workers > 1 and not getattr(cls, "_no_split_modules", None):
        raise ConfigError(
            f"{role}.num_workers={num_workers} shards the model with FSDP2, but {cls.__name__} "
            f"declares no decoder blocks (_no_split_modules): set {role}.num_workers=1"
        )


def _check_packing(config: Any, cls: type, attn: str, role: str) -> None:
    if attn not in PACKING_ATTENTION:
        raise ConfigError(
            f"{role}.use_sequence_packing=true needs eager, sdpa or flash attention, got "
            f"model.attn_implementation={attn}: set model.attn_implementation=auto, or "
            f"{role}.use_sequence_packing=false"
        )
    layer_types = set(getattr(config, "layer_types", None) or ())
    unknown = sorted(layer_types - set(PACKING_LAYER_TYPES))
    if attn in ("eager", "sdpa") and unknown:
        raise ConfigError(
            f"{role}.use_sequence_packing=true: {cls.__name__} has {', '.join(unknown)} layers, "
            f"which packed {attn} attention does not reproduce; set {role}.use_sequence_packing=false"
        )


def check_model_support(cfg: Any) -> None:
    """Check that the roles can load and run ``cfg.model`` as configured (driver side).

    Raises ConfigError for an attention implementation the model's class lacks, FSDP2
    sharding of a class without declared decoder blocks, and sequence packing with an
    attention path that cannot keep packed sequences apart. Models with remote code, and
    folders whose config cannot be read (the loaders report those), are not checked here.
    """
    model_cfg = cfg.model
    if model_cfg.attn_implementation not in ATTN_IMPLEMENTATIONS:
        resolve_attn_implementation(model_cfg.attn_implementation, None)  # raises the message
    if model_cfg.trust_remote_code:
        return
    config = _read_config(model_cfg)
    if config is None:
        return
    cls = model_class(config)
    if cls is None:
        raise ConfigError(
            f"model.path '{model_cfg.path}' is a '{config.model_type}' model, which transformers "
            f"cannot load as a causal LM: point model.path at a decoder-only language model"
        )
    attn = resolve_attn_implementation(model_cfg.attn_implementation, cls)
    rl = cfg.trainer.algorithm == "rl"
    _check_shardable(cls, "actor", cfg.actor.num_workers)
    _check_shardable(cls, "ref", cfg.ref.num_workers)
    if rl and cfg.algorithm.adv_estimator == "gae" and cfg.critic.model_path is None:
        base = model_class(config, base=True)
        if base is not None:
            _check_shardable(base, "critic", cfg.critic.num_workers)
    if rl:
        for role in ("actor", "ref"):
            if bool(cfg[role].use_sequence_packing):
                _check_packing(config, cls, attn, role)
