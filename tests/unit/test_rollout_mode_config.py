"""rollout.mode: sync by default; one_step_off and async checked against the settings they cannot run with."""

from __future__ import annotations

import pytest

import rlflow
from rlflow.errors import ConfigError
from rlflow.trainer.config_checks import check_config, resolve_placement

ONE_STEP_OFF = ("rollout.mode=one_step_off", "rollout.max_weight_staleness=1")


def check(*overrides: str) -> None:
    check_config(rlflow.compose_config("grpo", overrides=list(overrides)))


def test_sync_is_the_default_and_one_step_off_with_staleness_one_passes():
    assert rlflow.compose_config("grpo").rollout.mode == "sync"
    check()
    check(*ONE_STEP_OFF)


def test_unknown_mode_names_the_key():
    with pytest.raises(ConfigError, match=r"rollout.mode='fast' is not valid: use one of sync, one_step_off, async"):
        check("rollout.mode=fast")


def test_one_step_off_needs_staleness():
    with pytest.raises(ConfigError, match=r"rollout.mode=one_step_off.*rollout.max_weight_staleness=0.*"
                                          r"set rollout.max_weight_staleness=1"):
        check("rollout.mode=one_step_off")


def test_one_step_off_excludes_dynamic_sampling():
    with pytest.raises(ConfigError, match=r"rollout.mode=one_step_off.*algorithm.filter_groups.enable=true"):
        check(*ONE_STEP_OFF, "algorithm.filter_groups.enable=true")


def test_one_step_off_excludes_colocated_placement():
    with pytest.raises(ConfigError, match=r"rollout.placement=split: colocated .* time-share"):
        check(*ONE_STEP_OFF, "rollout.placement=colocated")


ASYNC = ("rollout.mode=async", "rollout.max_weight_staleness=2")


def test_async_with_a_staleness_bound_passes():
    check(*ASYNC)
    check("rollout.mode=async", "rollout.max_weight_staleness=1")


def test_async_needs_staleness():
    with pytest.raises(ConfigError, match=r"rollout.mode=async .*rollout.max_weight_staleness=0 forbids any lag: "
                                          r"set rollout.max_weight_staleness=2"):
        check("rollout.mode=async")


def test_async_excludes_dynamic_sampling():
    with pytest.raises(ConfigError, match=r"rollout.mode=async cannot run with algorithm.filter_groups.enable=true"):
        check(*ASYNC, "algorithm.filter_groups.enable=true")


def test_async_excludes_colocated_placement():
    with pytest.raises(ConfigError, match=r"rollout.mode=async needs rollout.placement=split"):
        check(*ASYNC, "rollout.placement=colocated")


def test_async_needs_a_positive_call_size():
    with pytest.raises(ConfigError, match=r"rollout.async_prompts_per_call=0 must be >= 1"):
        check(*ASYNC, "rollout.async_prompts_per_call=0")


@pytest.mark.parametrize("mode", ["sync", "one_step_off", "async"])
def test_negative_staleness_is_an_error_in_every_mode(mode):
    with pytest.raises(ConfigError, match=r"rollout.max_weight_staleness=-1 must be >= 0"):
        check(f"rollout.mode={mode}", "rollout.max_weight_staleness=-1")


PARTIAL = (*ASYNC, "rollout.partial_rollout=true")


def test_partial_rollouts_pass_in_async_mode():
    check(*PARTIAL)
    check(*PARTIAL, "rollout.partial_segment_tokens=1")


@pytest.mark.parametrize("mode", ["sync", "one_step_off"])
def test_partial_rollouts_need_async_mode(mode):
    with pytest.raises(ConfigError, match=rf"rollout.partial_rollout=true needs rollout.mode=async \(got rollout.mode={mode}\)"):
        check(f"rollout.mode={mode}", "rollout.max_weight_staleness=1", "rollout.partial_rollout=true")


def test_partial_rollouts_exclude_multi_turn_episodes():
    with pytest.raises(ConfigError, match=r"rollout.partial_rollout=true cannot run multi-turn episodes \(agent.enable=true\)"):
        check(*PARTIAL, "agent.enable=true", "agent.environment=guess_number")


def test_partial_segments_must_hold_a_token():
    with pytest.raises(ConfigError, match=r"rollout.partial_segment_tokens=0 must be >= 1"):
        check(*PARTIAL, "rollout.partial_segment_tokens=0")


def test_old_log_probs_from_the_rollout_leave_nothing_to_correct():
    check(*ASYNC, "actor.recompute_old_log_prob=rollout")
    with pytest.raises(ConfigError, match=r"actor.off_policy.correction=tis compares .* actor.recompute_old_log_prob=rollout does not compute"):
        check(*ASYNC, "actor.recompute_old_log_prob=rollout", "actor.off_policy.correction=tis")


IN_ACTOR = ("rollout.placement=in_actor", "actor.num_workers=1")


def test_in_actor_placement_passes_with_one_actor_worker():
    check(*IN_ACTOR)


def test_unknown_placement_names_the_key():
    with pytest.raises(ConfigError, match=r"rollout.placement='inside' is not valid: use one of auto, split, colocated, in_actor"):
        check("rollout.placement=inside")


@pytest.mark.parametrize("override, needed", [
    ("actor.num_workers=2", "actor.num_workers=1"),
    ("rollout.backend=vllm", "rollout.backend=hf"),
    ("rollout.mode=one_step_off", "rollout.mode=sync"),
    ("actor.lora.rank=8", "actor.lora.rank=0"),
    ("rollout.num_workers=2", "rollout.num_workers=1"),
    ("rollout.gpus_per_worker=1", "rollout.gpus_per_worker=0"),
    ("rollout.custom_resources={node_a:1}", "no rollout.custom_resources"),
])
def test_in_actor_placement_names_each_setting_it_cannot_run_with(override, needed):
    extra = ("rollout.max_weight_staleness=1",) if "mode" in override else ()
    with pytest.raises(ConfigError, match=rf"rollout.placement=in_actor needs {needed}:"):
        check(*IN_ACTOR, override, *extra)


def test_in_actor_placement_excludes_episodes():
    with pytest.raises(ConfigError, match=r"rollout.placement=in_actor needs agent.enable=false"):
        check(*IN_ACTOR, "agent.enable=true", "agent.environment=guess_number")


def test_auto_placement_samples_in_the_actor_where_the_run_allows_it():
    cfg = rlflow.compose_config("grpo")
    assert cfg.rollout.placement == "auto" and cfg.actor.num_workers == 1
    resolved = resolve_placement(cfg)
    assert resolved.rollout.placement == "in_actor"
    assert cfg.rollout.placement == "auto", "the caller's config is not changed"
    check_config(resolved)


@pytest.mark.parametrize("overrides", [
    ("actor.num_workers=2",),
    ("rollout.backend=vllm",),
    ONE_STEP_OFF,
    ("actor.lora.rank=8",),
    ("agent.enable=true", "agent.environment=guess_number"),
    ("rollout.num_workers=2",),
    ("rollout.gpus_per_worker=1",),
    ("rollout.custom_resources={node_a:1}",),
])
def test_auto_placement_starts_rollout_workers_where_in_actor_cannot_run(overrides):
    resolved = resolve_placement(rlflow.compose_config("grpo", overrides=list(overrides)))
    assert resolved.rollout.placement == "split"
    check_config(resolved)


@pytest.mark.parametrize("placement", ["split", "colocated", "in_actor"])
def test_a_placement_the_user_names_is_kept(placement):
    cfg = rlflow.compose_config("grpo", overrides=[f"rollout.placement={placement}"])
    assert resolve_placement(cfg) is cfg
