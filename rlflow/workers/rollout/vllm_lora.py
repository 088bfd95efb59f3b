"""The policy's LoRA adapter inside a vLLM engine (``actor.lora`` with ``sync=adapters``).

The engine keeps the base weights it loaded from ``model.path`` and serves the policy through
vLLM's LoRA support (``LLM(enable_lora=True)``, a ``LoRARequest`` on every generate call).
Each weight sync writes the adapters the actor shipped as a peft adapter folder and registers
it under a new adapter id; the previous adapter is removed first, so the engine holds exactly
one, and no prefix-cache entry of an older adapter can be reused (vLLM keys cached blocks by
adapter id). Until the first sync the engine serves the base model, which equals the actor's
starting policy (LoRA's B matrices start at zero).
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Any, Optional

from rlflow.models.lora import lora_enabled, write_adapter_folder

# The ranks vLLM 0.32 compiles LoRA kernels for (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def receives_adapters(cfg: Any) -> bool:
    lora = cfg.actor.lora
    return lora_enabled(lora) and lora.sync == "adapters"


def lora_engine_kwargs(rank: int) -> dict[str, Any]:
    """``vllm.LLM`` settings for one adapter of rank ``rank`` at a time."""
    max_rank = next((r for r in VLLM_LORA_RANKS if r >= rank), None)
    if max_rank is None:
        raise ValueError(f"actor.lora.rank={rank} is above vLLM's largest LoRA rank {VLLM_LORA_RANKS[-1]}")
    return {"enable_lora": True, "max_loras": 1, "max_lora_rank": max_rank}


class VLLMAdapterSlot:
    """Holds the engine's current policy adapter; ``request`` goes with every generate call."""

    def __init__(self, llm: Any, lora_cfg: Any, base_path: str) -> None:
        self.llm = llm
        self.lora_cfg = lora_cfg
        self.base_path = base_path
        self.request: Optional[Any] = None
        self._folder: Optional[str] = None
        self._next_id = 1

    def load(self, adapters: dict, version: int) -> None:
        """Serve ``adapters`` (the actor's adapter weights by parameter name) from now on."""
        from vllm.lora.request import LoRARequest

        folder = write_adapter_folder(tempfile.mkdtemp(prefix="rlflow-lora-"), adapters, self.lora_cfg, self.base_path)
        request = LoRARequest(f"policy-v{int(version)}", self._next_id, folder)
        self._next_id += 1
        self.drop()
        if not self.llm.llm_engine.add_lora(request):
            raise RuntimeError(f"vLLM did not load the policy adapter of weight version {version}")
        self.request, self._folder = request, folder

    def drop(self) -> None:
        """Remove the current adapter from the engine and delete its folder."""
        if self.request is not None:
            self.llm.llm_engine.remove_lora(self.request.lora_int_id)
            self.request = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
