"""Rule scorer for MATH-style answers (the content of the last ``\\boxed{...}``).

The extracted answer and the ground truth are normalised (LaTeX spacing and sizing commands,
``\\dfrac``/``\\tfrac``, degrees, dollar signs, trailing unit text, ``x = `` prefixes, ...) and
then compared: numerically (exact fractions) when both sides parse as a number, ``a/b`` or
``\\frac{a}{b}``, otherwise as normalised strings. So ``\\frac{1}{2}``, ``1/2`` and ``0.5`` are
all equal, while ``\\sqrt{2}`` only equals ``\\sqrt{2}``.
"""

from __future__ import annotations

import re
from fractions import Fraction

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed_content(text: str) -> str | None:
    """Return the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``.

    Braces are matched with a depth counter, so nested groups such as
    ``\\boxed{\\frac{1}{2}}`` come back whole. ``\\boxed 5`` (no braces) yields ``"5"``.
    Returns None when there is no box or its braces never close.
    """
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    cmd = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
    rest = text[start + len(cmd):]
    if rest.startswith(" "):
        # "\boxed 5": the argument is the next whitespace-delimited token.
        token = rest.strip().split(maxsplit=1)
        return token[0].rstrip("$.") if token else None
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, ch in enumerate(rest):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i]
    return None


def _strip_text_wrappers(s: str) -> str:
    """Drop trailing unit text ("5\\text{ cm}" -> "5"); unwrap a lone "\\text{A}" -> "A"."""
    s = re.sub(r"\\(?:mbox|mathrm|textbf)\{", r"\\text{", s)
    whole = re.fullmatch(r"\\text\{([^{}]*)\}", s)
    if whole:
        return whole.group(1)
    # Units follow the value; everything from the first \text{ on is dropped when a value
    # precedes it.
    idx = s.find("\\text{")
    if idx > 0:
        s = s[:idx]
    return s


def _fix_fracs(s: str) -> str:
    """Brace shorthand fractions: "\\frac12" -> "\\frac{1}{2}", "\\frac1{x}" -> "\\frac{1}{x}"."""
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    return s


def _fix_sqrt(s: str) -> str:
    """"\\sqrt2" -> "\\sqrt{2}"."""
    return re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)


def normalize_answer(answer: str) -> str:
    """Normalise a LaTeX answer string for comparison (see the module docstring)."""
    s = str(answer).strip()
    s = s.replace("\n", "")
    s = s.rstrip(".")
    # Spacing and sizing commands carry no meaning for the value.
    s = re.sub(r"\\[!,;:]", "", s)
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    # Degrees, percent and dollar signs.
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace("\\$", "").replace("$", "")
    s = _strip_text_wrappers(s)
    s = s.replace(" ", "")
    # "x=5" / "k = 5": keep the value when the left side is a short variable name.
    if s.count("=") == 1:
        lhs, rhs = s.split("=")
        if len(lhs) <= 2:
            s = rhs
    # LaTeX thousands separator "1{,}000" and plain "1,000" (but not tuples like "1,2").
    s = s.replace("{,}", ",")
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    s = _fix_fracs(s)
    s = _fix_sqrt(s)
    # ".5" -> "0.5", "-.5" -> "-0.5"; "5.0" / "5.00" -> "5".
    s = re.sub(r"^(-?)\.(\d)", r"\g<1>0.\2", s)
    s = re.sub(r"^(-?\d+)\.0+$", r"\1", s)
    return s


_FRAC_RE = re.compile(r"(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}")
_SLASH_RE = re.compile(r"(-?\d+(?:\.\d+)?)/(-?\d+(?:\.\d+)?)")
_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")


def to_number(normalized: str) -> Fraction | None:
    """Parse a normalised answer as an exact number: integer, decimal, ``a/b`` or ``\\frac{a}{b}``."""
    try:
        if _NUMBER_RE.fullmatch(normalized):
            return Fraction(normalized)
        match = _FRAC_RE.fullmatch(normalized)
        if match:
            value = Fraction(match.group(2)) / Fraction(match.group(3))
            return -value if match.group(1) else value
        match = _SLASH_RE.fullmatch(normalized)
        if match:
            return Fraction(match.group(1)) / Fraction(match.group(2))
    except ZeroDivisionError:
        return None
    return None


def is_equiv(answer: str, ground_truth: str) -> bool:
    """True when two answers are equal after normalisation (numerically when both parse)."""
    a, b = normalize_answer(answer), normalize_answer(ground_truth)
    if a == b:
        return True
    num_a, num_b = to_number(a), to_number(b)
    return num_a is not None and num_b is not None and num_a == num_b


def compute_score(solution_str: str, ground_truth: str) -> float:
    """Return 1.0 if the last ``\\boxed{...}`` in ``solution_str`` matches ``ground_truth``.

    ``ground_truth`` is the bare answer (e.g. ``"\\frac{1}{2}"``); if it itself contains a
    ``\\boxed{...}``, that box's content is used. No box in the response scores 0.0.
    """
    if not isinstance(ground_truth, (str, int, float)) or isinstance(ground_truth, bool):
        raise TypeError(f"ground_truth must be a string answer, got {ground_truth!r}")
    truth = str(ground_truth)
    boxed_truth = last_boxed_content(truth)
    if boxed_truth is not None:
        truth = boxed_truth
    answer = last_boxed_content(solution_str)
    if answer is None:
        return 0.0
    return 1.0 if is_equiv(answer, truth) else 0.0
