"""The per-role ``custom_resources`` config keys (pin roles to nodes with Ray custom resources)."""

from __future__ import annotations

import pytest

import rlflow
from rlflow.errors import ConfigError

ROLES = ("actor", "ref", "rollout", "reward", "critic")


def test_default_is_no_custom_resources():
    cfg = rlflow.compose_config("grpo")
    for role in ROLES:
        assert dict(cfg[role].custom_resources) == {}, role


@pytest.mark.parametrize("role", ROLES)
def test_command_line_override_sets_a_dict_of_floats(role):
    cfg = rlflow.compose_config("grpo", [f"{role}.custom_resources={{node_a:1,accel_b:0.5}}"])
    assert dict(cfg[role].custom_resources) == {"node_a": 1.0, "accel_b": 0.5}
    others = [r for r in ROLES if r != role]
    assert all(dict(cfg[r].custom_resources) == {} for r in others)


def test_single_entry_override():
    cfg = rlflow.compose_config("grpo", ["+rollout.custom_resources.node_worker=2"])
    assert dict(cfg.rollout.custom_resources) == {"node_worker": 2.0}


def test_non_numeric_amount_names_the_key():
    with pytest.raises(ConfigError, match="rollout.custom_resources"):
        rlflow.compose_config("grpo", ["rollout.custom_resources={node_worker:many}"])
