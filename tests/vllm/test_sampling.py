"""The config -> sampling mapping shared by both backends, the weight-version rule and the
log-prob gap metric (no engine started here)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

import rlflow
from rlflow.errors import ConfigError
from rlflow.workers.rollout import rollout_worker_class
from rlflow.workers.rollout.policy_lag import StaleWeightsError, check_weight_version, rollout_logprob_gap
from rlflow.workers.rollout.sampling import (
    SamplingConfigError,
    SamplingSettings,
    hf_generation_kwargs,
    request_seeds,
    resolve_sampling,
    stop_token_ids,
    vllm_sampling_kwargs,
)
from rlflow.workers.rollout.vllm_rollout import check_vllm_rollout_config


def rollout_cfg(**kw):
    base = dict(temperature=1.0, top_p=1.0, top_k=0, do_sample=True, stop_token_ids=[])
    base.update(kw)
    return OmegaConf.create(base)


def test_sampling_settings_from_config():
    s = resolve_sampling(rollout_cfg(temperature=0.7, top_p=0.9, top_k=5, stop_token_ids=[9, 3]), 6, [5, None, 5])
    assert s == SamplingSettings(False, 0.7, 0.9, 5, 6, (3, 5, 9))


@pytest.mark.parametrize("kw, call", [
    (dict(temperature=0.0), {}),
    (dict(do_sample=False), {}),
    ({}, dict(temperature=0.0)),
    ({}, dict(do_sample=False)),
])
def test_greedy_when_sampling_is_off_or_temperature_zero(kw, call):
    s = resolve_sampling(rollout_cfg(top_p=0.5, top_k=3, **kw), 4, [5], **call)
    assert s == SamplingSettings(True, 0.0, 1.0, 0, 4, (5,))


def test_negative_top_k_means_off_and_call_overrides_win():
    s = resolve_sampling(rollout_cfg(top_k=-1, temperature=0.0), 4, [5], temperature=1.3, do_sample=True)
    assert (s.greedy, s.temperature, s.top_k) == (False, 1.3, 0)


@pytest.mark.parametrize("kw, field", [
    (dict(temperature=-0.1), "rollout.temperature"),
    (dict(top_p=0.0), "rollout.top_p"),
    (dict(top_p=1.5), "rollout.top_p"),
    (dict(stop_token_ids=[-2]), "rollout.stop_token_ids"),
])
def test_bad_sampling_settings_name_the_key(kw, field):
    with pytest.raises(SamplingConfigError, match=field):
        resolve_sampling(rollout_cfg(**kw), 4, [5])


def test_a_stop_token_is_required():
    with pytest.raises(SamplingConfigError, match="rollout.stop_token_ids"):
        stop_token_ids([None], [])
    assert stop_token_ids([None], [7]) == (7,)


def test_hf_mapping():
    sampled = resolve_sampling(rollout_cfg(temperature=0.8, top_p=0.95, top_k=0, stop_token_ids=[7]), 4, [5])
    assert hf_generation_kwargs(sampled, pad_token_id=0) == dict(
        max_new_tokens=4, do_sample=True, eos_token_id=[5, 7], pad_token_id=0, use_cache=True,
        temperature=0.8, top_p=0.95, top_k=None,
    )
    greedy = resolve_sampling(rollout_cfg(temperature=0.0, top_k=4), 3, [5])
    assert hf_generation_kwargs(greedy, pad_token_id=0) == dict(
        max_new_tokens=3, do_sample=False, eos_token_id=[5], pad_token_id=0, use_cache=True,
    )


def test_vllm_mapping_builds_real_sampling_params():
    from vllm import SamplingParams

    s = resolve_sampling(rollout_cfg(temperature=0.8, top_p=0.9, top_k=4, stop_token_ids=[7]), 5, [5])
    params = SamplingParams(**vllm_sampling_kwargs(s, seed=123))
    assert (params.n, params.temperature, params.top_p, params.top_k) == (1, 0.8, 0.9, 4)
    assert (params.max_tokens, params.seed, params.logprobs) == (5, 123, 0)
    assert sorted(params.stop_token_ids) == [5, 7]
    assert params.detokenize is False and params.ignore_eos is False

    greedy = SamplingParams(**vllm_sampling_kwargs(resolve_sampling(rollout_cfg(do_sample=False), 2, [5])))
    assert greedy.temperature == 0.0 and greedy.top_k == 0 and greedy.top_p == 1.0


def test_request_seeds_are_distinct_and_reproducible():
    a = request_seeds(seed=3, rank=1, num_rows=16)
    assert a == request_seeds(seed=3, rank=1, num_rows=16)
    assert len(set(a)) == 16
    assert a[0] == ((3 * 1009 + 1) * 1_000_003) % (2**31 - 1)
    assert set(a).isdisjoint(request_seeds(seed=4, rank=1, num_rows=16))
    assert set(a).isdisjoint(request_seeds(seed=3, rank=0, num_rows=16))
    assert all(0 <= s < 2**31 - 1 for s in a)


def test_weight_version_rule():
    check_weight_version(held=4, expected=4)
    check_weight_version(held=4, expected=None)
    check_weight_version(held=2, expected=4, max_staleness=2)
    with pytest.raises(StaleWeightsError, match="holds weights version 3 but the trainer expects version 4"):
        check_weight_version(held=3, expected=4, rank=1)
    with pytest.raises(StaleWeightsError, match="rollout.max_weight_staleness>=3"):
        check_weight_version(held=1, expected=4, max_staleness=2)
    with pytest.raises(StaleWeightsError, match="newer"):
        check_weight_version(held=5, expected=4, max_staleness=3)
    with pytest.raises(ValueError, match="max_weight_staleness"):
        check_weight_version(held=4, expected=4, max_staleness=-1)


def test_logprob_gap_against_a_loop():
    torch.manual_seed(0)
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    diffs = [abs(a[i, t].item() - b[i, t].item()) for i in range(3) for t in range(5) if mask[i, t]]
    out = rollout_logprob_gap(a, b, mask)
    assert out["rollout/logprob_diff_mean"] == pytest.approx(sum(diffs) / len(diffs), rel=1e-6)
    assert out["rollout/logprob_diff_max"] == pytest.approx(max(diffs), rel=1e-6)
    empty = rollout_logprob_gap(a, b, torch.zeros(3, 5))
    assert empty == {"rollout/logprob_diff_mean": 0.0, "rollout/logprob_diff_max": 0.0}
    with pytest.raises(ValueError, match="one shape"):
        rollout_logprob_gap(a, b[:, :4], mask)


def test_rollout_worker_class_by_backend():
    from rlflow.workers.rollout.hf_rollout import HFRolloutWorker
    from rlflow.workers.rollout.vllm_rollout import VLLMRolloutWorker

    assert rollout_worker_class("hf") is HFRolloutWorker
    assert rollout_worker_class("vllm") is VLLMRolloutWorker
    with pytest.raises(ConfigError, match="rollout.backend='sglang'"):
        rollout_worker_class("sglang")


def test_config_accepts_vllm_backend_keys():
    cfg = rlflow.compose_config("grpo", overrides=[
        "rollout.backend=vllm", "rollout.placement=colocated", "rollout.tensor_parallel_size=1",
        "rollout.stop_token_ids=[7]", "rollout.max_weight_staleness=1",
    ])
    from rlflow.trainer.config_checks import check_config

    check_config(cfg)
    check_vllm_rollout_config(cfg)
    assert cfg.rollout.backend == "vllm" and list(cfg.rollout.stop_token_ids) == [7]


@pytest.mark.parametrize("override, key", [
    ("rollout.placement=nearby", "rollout.placement"),
    ("rollout.weight_sync=smoke", "rollout.weight_sync"),
    ("rollout.tensor_parallel_size=2", "rollout.tensor_parallel_size"),
    ("rollout.max_model_len=8", "rollout.max_model_len"),
    ("rollout.gpu_memory_utilization=1.5", "rollout.gpu_memory_utilization"),
    ("rollout.cpu_kv_cache_gib=0", "rollout.cpu_kv_cache_gib"),
    ("rollout.max_weight_staleness=-1", "rollout.max_weight_staleness"),
])
def test_bad_vllm_settings_name_the_key(override, key):
    cfg = rlflow.compose_config("grpo", overrides=["rollout.backend=vllm", override])
    with pytest.raises(ConfigError, match=key):
        check_vllm_rollout_config(cfg)


def test_colocated_gpu_shares_must_fit_one_device():
    base = ["rollout.backend=vllm", "rollout.placement=colocated", "actor.gpus_per_worker=0.5", "ref.gpus_per_worker=0.2"]
    check_vllm_rollout_config(rlflow.compose_config("grpo", overrides=base + ["rollout.gpus_per_worker=0.3"]))
    with pytest.raises(ConfigError, match=r"actor.gpus_per_worker=0.5 \+ rollout.gpus_per_worker=0.4 \+ ref.gpus_per_worker=0.2"):
        check_vllm_rollout_config(rlflow.compose_config("grpo", overrides=base + ["rollout.gpus_per_worker=0.4"]))
    split = [o.replace("colocated", "split") for o in base] + ["rollout.gpus_per_worker=1"]
    check_vllm_rollout_config(rlflow.compose_config("grpo", overrides=split))


def test_nccl_sync_needs_one_engine_worker():
    cfg = rlflow.compose_config("grpo", overrides=["rollout.weight_sync=nccl", "rollout.num_workers=2"])
    with pytest.raises(ConfigError, match="rollout.num_workers"):
        check_vllm_rollout_config(cfg)
