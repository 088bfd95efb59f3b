"""Rule reward scorers and the data_source registry."""

from __future__ import annotations

import pytest

from rlflow.rewards import arithmetic, gsm8k
from rlflow.rewards import math as math_scorer
from rlflow.rewards import registry
from rlflow.rewards import default_compute_score, register_scorer, unregister_scorer

# --------------------------------------------------------------------------- arithmetic


@pytest.mark.parametrize(
    "response, truth, expected",
    [
        ("7", "7", 1.0),
        ("7<|end|>", 7, 1.0),
        (" = 7 because 3+4", "7", 1.0),
        ("-3", "-3", 1.0),
        ("-3", " -3 ", 1.0),
        ("3", "-3", 0.0),  # sign matters
        ("- 3", "-3", 0.0),  # the minus must touch the digits
        ("12", "1", 0.0),  # whole integer, not a prefix
        ("07", "7", 1.0),  # compared as integers
        ("8 or 7", "7", 0.0),  # only the first integer counts
        ("", "7", 0.0),
        ("no digits here", "0", 0.0),
    ],
)
def test_arithmetic_scores(response, truth, expected):
    assert arithmetic.compute_score(response, truth) == expected


def test_arithmetic_bad_ground_truth():
    with pytest.raises(ValueError, match="ground_truth"):
        arithmetic.compute_score("7", "seven")
    with pytest.raises(TypeError, match="ground_truth"):
        arithmetic.compute_score("7", None)


# --------------------------------------------------------------------------- gsm8k


@pytest.mark.parametrize(
    "response, truth, expected",
    [
        ("so the total is #### 72", "72", 1.0),
        ("#### 1,234", "1234", 1.0),  # thousands separator
        ("#### $1,234.00", "1234", 1.0),  # dollar sign and trailing zeros
        ("####-5", "-5", 1.0),
        ("#### 5", "-5", 0.0),
        ("#### 72.5", "72", 0.0),
        ("#### 3 first, then #### 4", "4", 1.0),  # last marker wins
        ("the answer is 72", "72", 0.0),  # strict needs the marker
        ("#### seventy-two", "72", 0.0),
    ],
)
def test_gsm8k_strict(response, truth, expected):
    assert gsm8k.compute_score(response, truth) == expected


@pytest.mark.parametrize(
    "response, truth, expected",
    [
        ("first 3 apples, then 1,000 dollars", "1000", 1.0),  # last number, commas removed
        ("it costs $-5 in total", "-5", 1.0),
        ("The answer is 42.", "42", 1.0),  # sentence period is not a decimal point
        ("values 1,2,3", "3", 1.0),  # a list, not a thousands group
        ("0.5 of 10 is 5", "5", 1.0),
        ("42 then 41", "42", 0.0),
        ("no numbers", "1", 0.0),
    ],
)
def test_gsm8k_flexible(response, truth, expected):
    assert gsm8k.compute_score(response, truth, method="flexible") == expected


def test_gsm8k_format_score_and_score():
    assert gsm8k.compute_score("#### 5", "6", format_score=0.1) == 0.1
    assert gsm8k.compute_score("no answer", "6", format_score=0.1) == 0.0
    assert gsm8k.compute_score("#### 6", "6", format_score=0.1, score=2.0) == 2.0


def test_gsm8k_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        gsm8k.compute_score("#### 1", "1", method="lenient")
    with pytest.raises(ValueError, match="ground_truth"):
        gsm8k.compute_score("#### 1", "one")


# --------------------------------------------------------------------------- math


@pytest.mark.parametrize(
    "text, content",
    [
        (r"so \boxed{5}.", "5"),
        (r"\boxed{\frac{\sqrt{3}}{2}} done", r"\frac{\sqrt{3}}{2}"),  # nested braces
        (r"\boxed{1} then \boxed{{2}}", "{2}"),  # the last box
        (r"\fbox{7}", "7"),
        (r"\boxed 9$.", "9"),
        (r"\boxed{\frac{1}{2}", None),  # never closes
        ("no box", None),
    ],
)
def test_last_boxed_content(text, content):
    assert math_scorer.last_boxed_content(text) == content


@pytest.mark.parametrize(
    "response, truth, expected",
    [
        (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
        (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
        (r"\boxed{\dfrac{1}{2}}", r"\frac12", 1.0),
        (r"\boxed{1/2}", r"\tfrac{1}{2}", 1.0),
        (r"\boxed{.5}", "1/2", 1.0),
        (r"\boxed{-\frac{1}{2}}", "-0.5", 1.0),
        (r"\boxed{\frac{-1}{2}}", "-1/2", 1.0),
        (r"\boxed{\frac{1}{3}}", "0.33", 0.0),  # exact comparison, no loose tolerance
        (r"\boxed{\frac{\sqrt{3}}{2}}", r"\dfrac{\sqrt3}{2}", 1.0),
        (r"\boxed{\sqrt{2}}", "1.414", 0.0),
        (r"\boxed{90^\circ}", "90", 1.0),
        (r"\boxed{90^{\circ}}", "90", 1.0),
        (r"\boxed{\$5}", "5", 1.0),
        (r"\boxed{5\text{ cm}}", "5", 1.0),
        (r"\boxed{\text{(C)}}", "(C)", 1.0),
        (r"\boxed{\left( 1, 2 \right)}", "(1,2)", 1.0),
        (r"\boxed{(1,3)}", "(1,2)", 0.0),
        (r"\boxed{1{,}000}", "1000", 1.0),
        (r"\boxed{1,000}", "1000", 1.0),
        (r"\boxed{2.0}", "2", 1.0),
        (r"\boxed{50\%}", "50", 1.0),
        (r"\boxed{x = 3}", "3", 1.0),
        (r"\boxed{-3}", "3", 0.0),
        (r"\boxed{1} no wait \boxed{2}", "2", 1.0),
        (r"\boxed{1} no wait \boxed{2}", "1", 0.0),
        (r"\boxed{2}", r"the answer is \boxed{2}", 1.0),  # boxed ground truth is unwrapped
        ("the answer is 0.5", "0.5", 0.0),  # no box
        (r"\boxed{\frac{1}{2}", "0.5", 0.0),  # unclosed box
        (r"\boxed{1/0}", "1/0", 1.0),  # string-equal even though not a number
    ],
)
def test_math_scores(response, truth, expected):
    assert math_scorer.compute_score(response, truth) == expected


def test_math_to_number():
    from fractions import Fraction

    assert math_scorer.to_number(r"\frac{3}{4}") == Fraction(3, 4)
    assert math_scorer.to_number("-2.25") == Fraction(-9, 4)
    assert math_scorer.to_number("6/8") == Fraction(3, 4)
    assert math_scorer.to_number(r"\sqrt{2}") is None
    assert math_scorer.to_number("1/0") is None


# --------------------------------------------------------------------------- registry


@pytest.mark.parametrize(
    "data_source, response, truth, direct",
    [
        ("arithmetic", "7", "7", arithmetic.compute_score),
        ("arithmetic", "8", "7", arithmetic.compute_score),
        ("openai/gsm8k", "#### 1,000", "1000", gsm8k.compute_score),
        ("gsm8k", "answer 5", "5", gsm8k.compute_score),  # strict by default -> 0
        ("DigitalLearningGmbH/MATH-lighteval", r"\boxed{\frac12}", "0.5", math_scorer.compute_score),
        ("HuggingFaceH4/MATH-500", r"\boxed{3}", "4", math_scorer.compute_score),
        ("math", r"\boxed{3}", "3", math_scorer.compute_score),
    ],
)
def test_default_compute_score_dispatch(data_source, response, truth, direct):
    assert default_compute_score(data_source, response, truth) == direct(response, truth)


def test_default_compute_score_values():
    assert default_compute_score("arithmetic", "7", "7") == 1.0
    assert default_compute_score("gsm8k", "answer 5", "5") == 0.0
    assert default_compute_score("math", r"\boxed{0.5}", r"\frac{1}{2}", extra_info={"a": 1}) == 1.0


def test_unknown_data_source_names_the_fix():
    with pytest.raises(ValueError) as info:
        default_compute_score("my/dataset", "1", "1")
    assert "'my/dataset'" in str(info.value)
    assert "reward.custom_fn.path/name" in str(info.value)


def test_register_scorer_with_and_without_extra_info():
    seen = {}

    def plain(solution_str, ground_truth):
        return float(solution_str == ground_truth)

    def with_info(solution_str, ground_truth, extra_info=None):
        seen["extra_info"] = extra_info
        return {"score": 0.5, "length": len(solution_str)}

    try:
        register_scorer("custom/plain", plain)
        register_scorer("custom/info", with_info)
        assert default_compute_score("custom/plain", "a", "a") == 1.0
        assert default_compute_score("custom/plain", "a", "b") == 0.0
        assert default_compute_score("custom/info", "abc", "x", extra_info={"k": 2}) == {
            "score": 0.5,
            "length": 3,
        }
        assert seen["extra_info"] == {"k": 2}
        assert "custom/plain" in registry.registered_data_sources()
        with pytest.raises(ValueError, match="overwrite=True"):
            register_scorer("custom/plain", with_info)
    finally:
        unregister_scorer("custom/plain")
        unregister_scorer("custom/info")
    with pytest.raises(ValueError, match="custom/plain"):
        default_compute_score("custom/plain", "a", "a")


def test_register_scorer_overrides_builtin_then_restores():
    try:
        register_scorer("arithmetic", lambda s, g: 0.25, overwrite=True)
        assert default_compute_score("arithmetic", "7", "7") == 0.25
    finally:
        unregister_scorer("arithmetic")
    assert default_compute_score("arithmetic", "7", "7") == 1.0


def test_register_scorer_bad_arguments():
    with pytest.raises(TypeError, match="callable"):
        register_scorer("x", "not a function")
    with pytest.raises(TypeError, match="data_source"):
        register_scorer("", lambda s, g: 0.0)
