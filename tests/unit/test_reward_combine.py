"""CombinedReward / build_reward_fn: weighted sums, dict returns, specs by path, registry and object."""

from __future__ import annotations

import math
import textwrap

import pytest

from rlflow.rewards.combine import CombinedReward, build_reward_fn


def correct(data_source, solution_str, ground_truth, extra_info=None):
    return 1.0 if solution_str.strip() == str(ground_truth) else 0.0


def short(data_source, solution_str, ground_truth, extra_info=None):
    return {"score": -0.1 * len(solution_str), "length": len(solution_str)}


def uses_extra_info(data_source, solution_str, ground_truth, extra_info=None):
    return {"score": float(extra_info["bonus"]), "source": data_source}


def call(fn, solution, truth="7", source="arithmetic", extra=None):
    return fn(data_source=source, solution_str=solution, ground_truth=truth, extra_info=extra)


def test_weighted_sum_with_float_and_dict_components():
    reward = CombinedReward([(correct, 2.0), (short, 0.5)])
    out = call(reward, "7")
    assert out == {"score": 2.0 * 1.0 + 0.5 * (-0.1), "correct": 1.0, "short": -0.1, "short/length": 1}
    out = call(reward, " 8 ")
    assert math.isclose(out["score"], 2.0 * 0.0 + 0.5 * (-0.3))
    assert out["correct"] == 0.0 and out["short/length"] == 3
    assert reward.names == ["correct", "short"]


def test_components_receive_every_argument_and_positional_calls_work():
    reward = CombinedReward([("bonus", uses_extra_info, 3.0)])
    out = reward("math", "x", "1", {"bonus": 0.25})
    assert out == {"score": 0.75, "bonus": 0.25, "bonus/source": "math"}


def test_zero_and_negative_weights():
    out = call(CombinedReward([(correct, 0.0), (short, -1.0)]), "7")
    assert out["score"] == pytest.approx(0.1) and out["correct"] == 1.0


@pytest.mark.parametrize(
    "components, message",
    [
        ([], "non-empty list"),
        ([(correct,)], r"give \(fn, weight\)"),
        ([(correct, "1")], "weight must be a finite number"),
        ([(correct, float("nan"))], "weight must be a finite number"),
        ([(correct, True)], "weight must be a finite number"),
        ([(correct, 1.0), (correct, 2.0)], "two reward components are named 'correct'"),
        ([(lambda **kw: 1.0, 1.0)], "cannot name reward component"),
        ([("score", correct, 1.0)], "other than 'score'"),
        ([(3, 1.0)], "is not callable"),
    ],
)
def test_bad_components(components, message):
    with pytest.raises(ValueError, match=message) as info:
        CombinedReward(components)
    assert "\n" not in str(info.value)


def test_bad_component_results_name_the_component():
    reward = CombinedReward([("nodict", lambda **kw: {"value": 1.0}, 1.0)])
    with pytest.raises(ValueError, match=r"'nodict' returned a dict without 'score'"):
        call(reward, "7")
    reward = CombinedReward([("text", lambda **kw: "high", 1.0)])
    with pytest.raises(ValueError, match=r"'text' returned score 'high'"):
        call(reward, "7")


# --------------------------------------------------------------------------- build_reward_fn


REWARD_SOURCE = """
    def exact(data_source, solution_str, ground_truth, extra_info=None):
        return {"score": float(solution_str == ground_truth), "chars": len(solution_str)}

    def format_ok(data_source, solution_str, ground_truth, extra_info=None):
        return 0.5 if solution_str.isdigit() else 0.0

    NOT_CALLABLE = 1
"""


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(textwrap.dedent(REWARD_SOURCE))
    return str(path)


def test_build_from_paths_registry_and_callables(reward_file):
    reward = build_reward_fn(
        [
            {"path": reward_file, "name": "exact", "weight": 1.0},
            {"path": reward_file, "name": "format_ok", "weight": 0.2},
            {"path": None, "name": None, "weight": 0.5},  # registry by the row's data_source
            {"name": "arithmetic", "weight": 0.25, "label": "arith"},  # one registry scorer, always
            short,
        ]
    )
    assert reward.names == ["exact", "format_ok", "default", "arith", "short"]
    out = call(reward, "7", truth="7", source="arithmetic")
    # exact 1, format 0.5, arithmetic scorer 1 (twice), short -0.1
    assert out["score"] == pytest.approx(1.0 * 1 + 0.2 * 0.5 + 0.5 * 1 + 0.25 * 1 + 1.0 * -0.1)
    assert out["exact/chars"] == 1 and out["default"] == 1.0 and out["arith"] == 1.0
    # gsm8k's strict scorer wants "#### 7": the dispatching component follows the row's source,
    # the fixed one keeps scoring with the arithmetic scorer.
    out = call(reward, "7", truth="7", source="gsm8k")
    assert out["default"] == 0.0 and out["arith"] == 1.0


def test_build_accepts_omegaconf_lists(reward_file):
    from omegaconf import OmegaConf

    specs = OmegaConf.create([{"path": reward_file, "name": "format_ok", "weight": 2}])
    reward = build_reward_fn(specs)
    assert call(reward, "12")["score"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "specs, message",
    [
        ([], "non-empty list"),
        ({"path": None}, "non-empty list"),
        ([{"path": "x.py"}], "'name' is required with 'path'"),
        ([{"name": "nope"}], "data_source 'nope', which has no registered scorer"),
        ([{"name": "exact", "weights": 1}], r"unknown keys \['weights'\]"),
        ([3], "reward spec 0 is 3"),
    ],
)
def test_bad_specs(specs, message):
    with pytest.raises(ValueError, match=message):
        build_reward_fn(specs)


def test_bad_specs_with_files(reward_file, tmp_path):
    with pytest.raises(ValueError, match="'missing' is not defined in"):
        build_reward_fn([{"path": reward_file, "name": "missing"}])
    with pytest.raises(ValueError, match="is not callable"):
        build_reward_fn([{"path": reward_file, "name": "NOT_CALLABLE"}])
    with pytest.raises(ValueError, match="not found"):
        build_reward_fn([{"path": str(tmp_path / "gone.py"), "name": "exact"}])
    with pytest.raises(ValueError, match="weight must be a finite number"):
        build_reward_fn([{"path": reward_file, "name": "exact", "weight": "heavy"}])
