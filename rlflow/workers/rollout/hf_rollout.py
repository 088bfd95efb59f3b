"""Rollout worker on Hugging Face ``generate`` (KV cache on), for CPU runs and small models.

The driver repeats each prompt ``rollout.n`` times before sharding, so a worker generates one
response per row. Responses are right-padded to ``data.max_response_length``; the mask covers
tokens up to and including the first EOS, which is what the trainer and the reward expect
whatever the backend. Like the vLLM backend, the result carries ``rollout_log_probs``: the
log-prob of each sampled token under the distribution the actor scores (logits divided by
the sampling temperature), 0 outside the response mask.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from rlflow.config.schema import typed_config
from rlflow.data.batched_data_dict import BatchedDataDict
from rlflow.distributed.state_transport import get_state
from rlflow.models.loading import load_causal_lm, load_tokenizer
from rlflow.models.packing import build_model_inputs, score_responses
from rlflow.models.lora import add_lora_adapters, is_adapter_key, lora_enabled
from rlflow.utils.torch_functional import get_response_mask, response_batch
from rlflow.workers.base import Worker
from rlflow.workers.rollout.episode_rollout import EpisodeRollout, cut_at_stop
from rlflow.workers.rollout.sampling import SamplingSettings, hf_generation_kwargs, resolve_sampling


class HFRolloutWorker(EpisodeRollout, Worker):
    def __init__(self, config: dict, score_fn: Optional[Any] = None, model: Optional[torch.nn.Module] = None) -> None:
        """``model``: generate with this model (the actor's own, ``rollout.placement=in_actor``)
        instead of loading one; its owner keeps its threads, training mode and weights."""
        super().__init__()
        self.cfg = typed_config(config)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.tokenizer = load_tokenizer(self.cfg.model)
        self.receives_adapters = False
        if model is not None:
            self.model = model
        else:
            torch.set_num_threads(max(1, self.cfg.rollout.torch_threads))
            self.model = load_causal_lm(self.cfg.model, device=self.device)
            # LoRA with adapter-only syncs: the same adapters on this worker's own base copy.
            lora = self.cfg.actor.lora
            self.receives_adapters = lora_enabled(lora) and lora.sync == "adapters"
            if self.receives_adapters:
                self.model = add_lora_adapters(self.model, lora)
            self.model.requires_grad_(False)
            self.model.eval()
        self.weight_version = 0
        eos = self.tokenizer.eos_token_id
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids = {eos} | (set(gen_eos) if isinstance(gen_eos, list) else {gen_eos})
        self.eos_token_ids = sorted(i for i in ids if i is not None)
        self.pad_token_id = self.tokenizer.pad_token_id
        self._init_episodes(score_fn)

    def sampling_settings(self, temperature: Optional[float] = None, do_sample: Optional[bool] = None) -> SamplingSettings:
        """The shared config -> sampling mapping (see ``rollout/sampling.py``)."""
        return resolve_sampling(
            self.cfg.rollout, self.cfg.data.max_response_length, self.eos_token_ids, temperature, do_sample
        )

    def generation_config(self, temperature: float, do_sample: bool) -> GenerationConfig:
        return GenerationConfig(**hf_generation_kwargs(self.sampling_settings(temperature, do_sample), self.pad_token_id))

    @torch.no_grad()
    def generate(
        self,
        batch: BatchedDataDict,
        seed: int,
        temperature: Optional[float] = None,
        do_sample: Optional[bool] = None,
        expected_weight_version: Optional[int] = None,
    ) -> BatchedDataDict:
        """Generate one response per row of left-padded ``input_ids`` / ``attention_mask``."""
        settings = self.start_call(seed, temperature, do_sample, expected_weight_version)

        max_len = self.cfg.data.max_response_length
        outputs = []
        for mb in batch.make_microbatch_iterator(self._chunk(batch.size)):
            prompts = mb["input_ids"].to(self.device)
            prompt_mask = mb["attention_mask"].to(self.device)
            responses, log_probs = self._sample(prompts, prompt_mask, settings)
            if responses.shape[1] < max_len:
                pad = responses.new_full((responses.shape[0], max_len - responses.shape[1]), self.pad_token_id)
                responses = torch.cat([responses, pad], dim=1)
                log_probs = torch.cat([log_probs, log_probs.new_zeros(pad.shape)], dim=1)
            response_mask = get_response_mask(responses, settings.stop_token_ids, self.pad_token_id)
            # Anything after the first stop token is not part of the answer; make it padding.
            responses = torch.where(response_mask.bool(), responses, torch.full_like(responses, self.pad_token_id))
            out = BatchedDataDict(response_batch(prompts.cpu(), prompt_mask.cpu(), responses.cpu(), response_mask.cpu()))
            out["rollout_log_probs"] = (log_probs * response_mask).cpu()
            outputs.append(out)
        result = BatchedDataDict.from_batches(outputs)
        result["weight_version"] = [self.weight_version] * result.size
        return result

    def _chunk(self, size: int) -> int:
        return max(1, min(int(self.cfg.rollout.micro_batch_size or size), size))

    def _sample(self, prompts: torch.Tensor, prompt_mask: torch.Tensor, settings: SamplingSettings) -> tuple[torch.Tensor, torch.Tensor]:
        """``(generated ids, their log-probs)`` for left-padded prompts, ``[B, new tokens]``."""
        recorder = _SampledTokenLogProbs(settings.temperature if not settings.greedy else 1.0)
        out = self.model.generate(
            input_ids=prompts, attention_mask=prompt_mask,
            generation_config=GenerationConfig(**hf_generation_kwargs(settings, self.pad_token_id)),
            logits_processor=LogitsProcessorList([recorder]),
        )
        return out[:, prompts.shape[1]:], recorder.finish(out)

    def generate_turns(
        self, prompts: list[list[int]], budgets: list[int], settings: SamplingSettings, seed: int
    ) -> list[tuple[list[int], list[float]]]:
        stops = set(settings.stop_token_ids)
        results: list[tuple[list[int], list[float]]] = []
        step = self._chunk(len(prompts))
        for start in range(0, len(prompts), step):
            rows, limits = prompts[start:start + step], budgets[start:start + step]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, width - len(row):] = torch.tensor(row)
                mask[i, width - len(row):] = 1
            generated, log_probs = self._sample(
                ids.to(self.device), mask.to(self.device), replace(settings, max_tokens=max(limits))
            )
            for tokens, lps, limit in zip(generated.tolist(), log_probs.tolist(), limits):
                results.append(cut_at_stop(tokens, lps, limit, stops))
        return results

    @torch.no_grad()
    def engine_log_probs(self, batch: BatchedDataDict) -> BatchedDataDict:
        """This worker's log-probs of given responses at temperature 1: ``{"log_probs": [B, T]}``,
        0 on padding (``input_ids``, ``attention_mask``, ``position_ids``, ``responses`` as
        ``generate`` returns them); a check that the rollout and the actor hold the same policy."""
        inputs = build_model_inputs(
            batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device),
            batch["position_ids"].to(self.device), batch["responses"].to(self.device), "padded",
        )
        log_probs, _ = score_responses(self.model, inputs)
        return BatchedDataDict({"log_probs": log_probs.cpu()})

    def update_weights(self, state_ref: list, version: int) -> int:
        """Load the actor's full state dict, or its LoRA adapters (passed as ``[ObjectRef]``),
        and record its version."""
        state = get_state(state_ref[0])
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        tied = set(getattr(self.model, "_tied_weights_keys", None) or [])
        missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
        if self.receives_adapters:  # the base weights stay as loaded from model.path
            missing = [k for k in missing if is_adapter_key(k)]
        if missing or unexpected:
            raise RuntimeError(
                f"weight sync mismatch: missing {missing[:5]}, unexpected {list(unexpected)[:5]}"
            )
        self.weight_version = int(version)
        return self.weight_version


class _SampledTokenLogProbs(LogitsProcessor):
    """Records ``log_softmax(logits / temperature)`` at each sampled token.

    ``generate`` runs custom processors before its temperature / top-k / top-p warpers, so the
    scores seen here are the model's logits. The token drawn from one step's scores is only
    known at the next call (the last column of ``input_ids``), or, for the final step, from
    the finished sequences; only one step's ``[B, V]`` log-probs are held at a time.
    """

    def __init__(self, temperature: float) -> None:
        self.temperature = float(temperature)
        self.previous: Optional[torch.Tensor] = None
        self.steps: list[torch.Tensor] = []

    def _take(self, tokens: torch.Tensor) -> None:
        if self.previous is not None:
            self.steps.append(self.previous.gather(-1, tokens[:, None]).squeeze(-1))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.previous is not None:
            self._take(input_ids[:, -1])
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """``[B, generated]`` float32 log-probs of the generated tokens of ``sequences``."""
        self._take(sequences[:, -1])
        self.previous = None
        if not self.steps:
            return torch.zeros(sequences.shape[0], 0)
        return torch.stack(self.steps, dim=1).float()
