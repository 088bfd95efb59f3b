"""Rule scorer for GSM8K-style answers (``data_source`` "openai/gsm8k" or "gsm8k").

Two extraction methods:

* ``strict``: the number right after the last ``"#### "`` marker (the GSM8K answer format);
* ``flexible``: the last number anywhere in the response.

Commas used as thousands separators and ``$`` signs are removed before comparing; numbers are
compared exactly as fractions, so ``"72.0"`` matches ``"72"``.
"""

from __future__ import annotations

import re
from fractions import Fraction

# A number: thousands-grouped ("1,234.5"), plain ("-12", "3.25") or a bare decimal (".5").
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
_NUMBER_RE = re.compile(_NUMBER)
_STRICT_RE = re.compile(r"####\s*(" + _NUMBER + r")")

METHODS = ("strict", "flexible")


def _to_fraction(text: str) -> Fraction | None:
    cleaned = text.replace(",", "").replace("$", "").strip()
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(solution_str: str, method: str = "strict") -> str | None:
    """Extract the answer string (commas and ``$`` removed), or None if there is none."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    # '$' may sit between the marker/sign and the digits ("#### $1,000", "-$5").
    text = solution_str.replace("$", "")
    if method == "strict":
        matches = _STRICT_RE.findall(text)
    else:
        matches = _NUMBER_RE.findall(text)
    if not matches:
        return None
    return matches[-1].replace(",", "")


def compute_score(
    solution_str: str,
    ground_truth: str | int | float,
    method: str = "strict",
    format_score: float = 0.0,
    score: float = 1.0,
) -> float:
    """Score a response against the numeric ``ground_truth``.

    Returns ``score`` when the extracted answer equals the ground truth, ``format_score`` when
    an answer was extracted but is wrong, and 0.0 when no answer could be extracted.
    """
    answer = extract_answer(solution_str, method)
    if answer is None:
        return 0.0
    expected = _to_fraction(str(ground_truth))
    if expected is None:
        raise ValueError(f"ground_truth must be a number such as '72' or '1,234', got {ground_truth!r}")
    got = _to_fraction(answer)
    return score if got == expected else format_score
