"""One mapping from the rollout config to sampling settings, shared by every rollout backend.

Both backends must draw from the same distribution for the same config, so the rules live
here once: sampling is on only when ``do_sample`` is true AND the temperature is positive
(otherwise decoding is greedy); ``top_k <= 0`` and ``top_p >= 1`` mean "no filtering"; a
response stops at the first token in ``stop_token_ids`` (the tokenizer's and the model's EOS
ids plus ``rollout.stop_token_ids``) or after ``data.max_response_length`` tokens.

The backend-specific functions return plain keyword dicts (no vLLM import here), so the
mapping is testable where vLLM is not installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

# vLLM seeds a torch.Generator per request; keep seeds in the positive int32 range so every
# backend and platform accepts them.
_SEED_MODULUS = 2**31 - 1


class SamplingConfigError(ValueError):
    """A rollout sampling setting that no backend can honour."""


@dataclass(frozen=True)
class SamplingSettings:
    """Backend-neutral sampling settings for one ``generate`` call.

    ``greedy`` True means argmax decoding; then ``temperature`` is 0 and ``top_p`` / ``top_k``
    are the neutral 1.0 / 0. ``stop_token_ids`` is sorted and never empty.
    """

    greedy: bool
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    stop_token_ids: tuple[int, ...]


def stop_token_ids(eos_token_ids: Iterable[Optional[int]], extra: Iterable[int] = ()) -> tuple[int, ...]:
    """Sorted, de-duplicated union of the EOS ids (``None`` entries dropped) and ``extra``."""
    ids = {int(i) for i in eos_token_ids if i is not None}
    for i in extra:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise SamplingConfigError(
                f"rollout.stop_token_ids must hold non-negative token ids, got {i!r}"
            )
        ids.add(int(i))
    if not ids:
        raise SamplingConfigError(
            "no stop token: the tokenizer has no eos_token_id and rollout.stop_token_ids is empty; "
            "set rollout.stop_token_ids=[<id>]"
        )
    return tuple(sorted(ids))


def resolve_sampling(
    rollout_cfg: Any,
    max_response_length: int,
    eos_token_ids: Iterable[Optional[int]],
    temperature: Optional[float] = None,
    do_sample: Optional[bool] = None,
) -> SamplingSettings:
    """Sampling settings from ``rollout.*`` with per-call overrides.

    Args:
        rollout_cfg: the ``rollout`` config node (``temperature``, ``top_p``, ``top_k``,
            ``do_sample`` and optionally ``stop_token_ids``).
        max_response_length: ``data.max_response_length``; the token budget per response.
        eos_token_ids: the tokenizer's / model's EOS ids.
        temperature, do_sample: override the config for this call (validation uses them).
    """
    temp = float(rollout_cfg.temperature if temperature is None else temperature)
    sample = bool(rollout_cfg.do_sample if do_sample is None else do_sample)
    top_p = float(rollout_cfg.top_p)
    top_k = int(rollout_cfg.top_k)
    if temp < 0:
        raise SamplingConfigError(f"rollout.temperature={temp} must be >= 0 (0 means greedy)")
    if not 0.0 < top_p <= 1.0:
        raise SamplingConfigError(f"rollout.top_p={top_p} must be in (0, 1]; use 1.0 to turn it off")
    if int(max_response_length) <= 0:
        raise SamplingConfigError(f"data.max_response_length={max_response_length} must be positive")
    stops = stop_token_ids(eos_token_ids, getattr(rollout_cfg, "stop_token_ids", None) or ())
    greedy = not (sample and temp > 0)
    if greedy:
        return SamplingSettings(True, 0.0, 1.0, 0, int(max_response_length), stops)
    return SamplingSettings(False, temp, top_p, max(top_k, 0), int(max_response_length), stops)


def hf_generation_kwargs(settings: SamplingSettings, pad_token_id: Optional[int]) -> dict[str, Any]:
    """Keyword arguments for ``transformers.GenerationConfig``.

    HF stops a row at any id in ``eos_token_id``, so the extra stop ids are folded into it.
    """
    kwargs: dict[str, Any] = dict(
        max_new_tokens=settings.max_tokens,
        do_sample=not settings.greedy,
        eos_token_id=list(settings.stop_token_ids),
        pad_token_id=pad_token_id,
        use_cache=True,
    )
    if not settings.greedy:
        kwargs.update(
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k if settings.top_k > 0 else None,
        )
    return kwargs


def vllm_sampling_kwargs(settings: SamplingSettings, seed: Optional[int] = None) -> dict[str, Any]:
    """Keyword arguments for ``vllm.SamplingParams`` for ONE response (``n=1``).

    ``logprobs=0`` asks for the log-prob of the sampled token only; ``ignore_eos`` stays off
    and the EOS ids are also listed as stop ids, so the engine stops on them even when its
    own idea of EOS differs from the tokenizer's. ``detokenize`` is off: rollouts need ids.
    """
    return dict(
        n=1,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        max_tokens=settings.max_tokens,
        stop_token_ids=list(settings.stop_token_ids),
        logprobs=0,
        seed=seed,
        detokenize=False,
        skip_special_tokens=False,
    )


def request_seeds(seed: int, rank: int, num_rows: int) -> list[int]:
    """One seed per row of a ``generate`` call, distinct across rows, ranks and steps.

    Row ``i`` of rank ``r`` at step seed ``s`` gets ``((s * 1009 + r) * 1_000_003 + i) mod
    (2**31 - 1)``: the same run resamples the same tokens, and the n copies of a prompt
    (adjacent rows) get different samples.
    """
    base = (int(seed) * 1009 + int(rank)) * 1_000_003
    return [(base + i) % _SEED_MODULUS for i in range(int(num_rows))]
