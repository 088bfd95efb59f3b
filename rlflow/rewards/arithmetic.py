"""Rule scorer for the synthetic arithmetic task (``data_source == "arithmetic"``)."""

from __future__ import annotations

import re

# The first integer in the response, with an optional minus sign directly in front of it.
_FIRST_INTEGER = re.compile(r"-?\d+")


def parse_ground_truth(ground_truth: str | int) -> int:
    """Parse the integer ground truth (``"7"``, ``" -3 "`` or ``7``)."""
    if isinstance(ground_truth, bool) or not isinstance(ground_truth, (str, int)):
        raise TypeError(f"ground_truth must be an int or an integer string, got {ground_truth!r}")
    try:
        return int(str(ground_truth).strip())
    except ValueError:
        raise ValueError(f"ground_truth must be an integer, got {ground_truth!r}") from None


def compute_score(solution_str: str, ground_truth: str | int) -> float:
    """Return 1.0 if the first integer in ``solution_str`` equals ``ground_truth``, else 0.0.

    Only the first integer counts, so a response that lists several candidates is not
    rewarded for containing the answer somewhere. No integer at all scores 0.0.
    """
    expected = parse_ground_truth(ground_truth)
    match = _FIRST_INTEGER.search(solution_str)
    if match is None:
        return 0.0
    return 1.0 if int(match.group()) == expected else 0.0
