"""Actor -> vLLM weight sync through vLLM's weight-transfer API (vLLM >= 0.32).

vLLM 0.32 gives RL trainers a public weight-update lifecycle on ``vllm.LLM``::

    LLM(..., weight_transfer_config=WeightTransferConfig(backend=NAME))
    llm.init_weight_transfer_engine({...})            # once
    llm.start_weight_update()                          # every sync
    llm.update_weights({"update_info": {...}})         #   one or more chunks
    llm.finish_weight_update(weight_version="7")       #   engine records the version

Each backend is a ``WeightTransferEngine`` registered with ``WeightTransferEngineFactory``;
vLLM ships ``nccl`` (broadcast from the trainer, split placement) and ``ipc`` (CUDA IPC,
same GPU). Neither runs on CPU, so this module registers one more backend,
``rlflow_object_store``: the update carries ``[ObjectRef]`` of the actor's full state dict
(``PolicyWorker.publish_weights``), the engine fetches it from the Ray object store and loads
it with the model's own ``load_weights`` inside vLLM's layerwise-reload lifecycle, exactly
like the built-in backends do. It needs the engine's worker in the calling process (the
uni-process executor: ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and ``tensor_parallel_size=1``),
because an ObjectRef only resolves inside a Ray worker.

``NcclWeightSender`` is the actor-side half of the ``nccl`` backend for GPU runs with split
placement: vLLM's ``NCCLTrainerWeightTransferEngine`` drives the rollout actors through
``RolloutActorsClient`` (vLLM's ``VLLMWeightSyncClient`` protocol over Ray actor handles).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from vllm.config.weight_transfer import WeightTransferConfig  # noqa: F401  (re-exported)
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

from rlflow.distributed.state_transport import get_state

OBJECT_STORE_BACKEND = "rlflow_object_store"


@dataclass
class ObjectStoreInitInfo(WeightTransferInitInfo):
    """No rendezvous: the Ray object store is reachable from every Ray worker."""


@dataclass
class ObjectStoreUpdateInfo(WeightTransferUpdateInfo):
    """``state_ref``: ``[ObjectRef]`` of a full HF-named state dict (CPU tensors)."""

    state_ref: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.state_ref) != 1 or not isinstance(self.state_ref[0], ray.ObjectRef):
            raise ValueError(
                "state_ref must be [ObjectRef] of the actor's state dict (PolicyWorker.publish_weights), "
                f"got {self.state_ref!r}"
            )


class ObjectStoreWeightTransferEngine(WeightTransferEngine[ObjectStoreInitInfo, ObjectStoreUpdateInfo]):
    """Loads a state dict fetched from the Ray object store into the engine's model."""

    init_info_cls = ObjectStoreInitInfo
    update_info_cls = ObjectStoreUpdateInfo

    def init_transfer_engine(self, init_info: ObjectStoreInitInfo) -> None:
        return None

    def start_weight_update(self) -> None:
        # Same lifecycle as vLLM's own checkpoint-format backends: layerwise reload re-runs
        # any post-load processing (fused or quantised layouts) once all weights are in.
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class synchronises the accelerator after loading; there is none on CPU.
        self.receive_weights(self.parse_update_info(update_info))
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def receive_weights(self, update_info: ObjectStoreUpdateInfo) -> None:
        state = get_state(update_info.state_ref[0])
        # load_weights maps HF names onto vLLM's fused layout (qkv_proj, gate_up_proj) and
        # skips what the model ties or does not own (lm_head with tied embeddings).
        self.model.load_weights(weights=((name, tensor) for name, tensor in state.items()))

    def shutdown(self) -> None:
        return None


def register_object_store_backend() -> None:
    """Register ``rlflow_object_store`` with vLLM's engine factory (idempotent, per process)."""
    try:
        WeightTransferEngineFactory.register_engine(OBJECT_STORE_BACKEND, ObjectStoreWeightTransferEngine)
    except ValueError:
        pass  # already registered in this process (a second worker class instance, a re-import)


class RolloutActorsClient:
    """vLLM's ``VLLMWeightSyncClient`` protocol over ``VLLMRolloutWorker`` actor handles.

    vLLM's own ``RayVLLMWeightSyncClient`` calls ``update_weights(request)`` on the actor, a
    name ``VLLMRolloutWorker`` keeps for rlflow's ``update_weights(state_ref, version)``; the
    chunk call goes to ``update_weights_chunk`` instead. Every call fans out and waits.
    """

    def __init__(self, handles: list) -> None:
        self.handles = list(handles)

    def _all(self, method: str, *args: Any) -> None:
        ray.get([getattr(h, method).remote(*args) for h in self.handles])

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._all("init_weight_transfer_engine", {"init_info": init_info})

    def start_weight_update(self) -> None:
        self._all("start_weight_update")

    def update_weights(self, update_info: Any) -> None:
        self._all("update_weights_chunk", {"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all("finish_weight_update")
        if weight_version is not None:
            self._all("set_weight_version", int(weight_version))


class NcclWeightSender:
    """Actor-side NCCL sender for ``rollout.weight_sync=nccl`` (GPU, split placement).

    Build it on every actor rank after the rollout group exists (untested here: it needs GPUs
    and a CUDA build of vLLM); rank 0 opens a NCCL group of
    ``1 + sum(engine ranks)`` members with the engines (vLLM's ``NCCLTrainerWeightTransferEngine``),
    the other ranks only take part in the FSDP all-gather of each parameter. ``send(version)``
    broadcasts every parameter and makes the engines record ``version``.

    Args:
        model: the actor's (possibly FSDP2-sharded) module.
        rollout_handles: Ray actor handles of the ``VLLMRolloutWorker`` s.
        rank: this actor rank; rank 0 sends.
        master_address, master_port: rendezvous address on actor rank 0's node.
        engine_world_size: total vLLM workers (rollout workers x tensor_parallel_size).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        rollout_handles: list,
        rank: int,
        master_address: str,
        master_port: int,
        engine_world_size: int,
    ) -> None:
        from vllm.distributed.weight_transfer.base import ModuleSource
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerInitInfo,
            NCCLTrainerWeightTransferEngine,
        )

        self.client = RolloutActorsClient(rollout_handles)
        self.engine = NCCLTrainerWeightTransferEngine.trainer_init(
            NCCLTrainerInitInfo(
                master_address=master_address,
                master_port=int(master_port),
                world_size=1 + int(engine_world_size),
                rank=int(rank),
            ),
            client=self.client,
            source=ModuleSource(model),
        )
        self.rank = int(rank)

    def send(self, version: int) -> None:
        """Broadcast the current weights (a collective over the actor ranks) and set ``version``."""
        self.engine.send_weights()
        if self.rank == 0:
            # send_weights already ran start / update / finish on the engines.
            self.client._all("set_weight_version", int(version))
