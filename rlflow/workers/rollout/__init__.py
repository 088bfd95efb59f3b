"""Rollout workers: one class per generation backend, all with the same ``generate`` contract."""

from __future__ import annotations

from rlflow.errors import ConfigError

ROLLOUT_BACKEND_NAMES = ("hf", "vllm")


def vllm_installed() -> bool:
    """True when an installed vLLM package is importable.

    A folder named ``vllm`` without ``__init__.py`` on ``sys.path`` (such as ``tests/vllm``
    under pytest) is a namespace package with no origin; it does not count.
    """
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None


def rollout_worker_class(backend: str) -> type:
    """The rollout worker class for ``rollout.backend``: ``HFRolloutWorker`` or ``VLLMRolloutWorker``.

    Imported lazily, so choosing ``hf`` never imports vLLM code and a missing vLLM install
    fails here with an install hint instead of at start-up of every worker.
    """
    if backend == "hf":
        from rlflow.workers.rollout.hf_rollout import HFRolloutWorker

        return HFRolloutWorker
    if backend == "vllm":
        if not vllm_installed():
            raise ConfigError(
                "rollout.backend=vllm but vLLM is not installed in this environment: install it "
                "(see docs/vllm.md; `make test-vllm` builds .venv-vllm) or use rollout.backend=hf"
            )
        from rlflow.workers.rollout.vllm_rollout import VLLMRolloutWorker

        return VLLMRolloutWorker
    raise ConfigError(f"rollout.backend='{backend}' is not valid: use one of {', '.join(ROLLOUT_BACKEND_NAMES)}")
