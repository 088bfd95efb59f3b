"""Rule scorer for code generation (``data_source == "code"``): run the tests in the sandbox.

The program is the response's code followed by the row's ground truth, Python test code
(typically ``assert`` statements), run by :func:`rlflow.agents.sandbox.run_python`. It
scores 1.0 when the whole program runs to its end without error.

"To its end" is checked, not assumed from the exit status: a solution that calls
``sys.exit(0)``, ``exit()`` or ``os._exit(0)`` would otherwise stop before the tests and
still exit cleanly. The program therefore ends by writing a random token that the
response cannot know in advance, and only a run whose output ends with it passes. (Code
that reads its own source file could find the token; the scorer is a filter against
accidents and easy hacks, not against a policy that searches for that.)
"""

from __future__ import annotations

import re
import secrets
from typing import Any, Optional

from rlflow.agents.sandbox import SandboxLimits, run_python

# Kept under reward.timeout_s (10 s by default), so that the sandbox, not the reward
# worker's alarm, ends a slow program and the run is counted as a timeout of the code.
REWARD_LIMITS = SandboxLimits(cpu_time_s=4.0, wall_time_s=6.0, memory_mb=512)

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = frozenset({"python", "py", "python3"})
_FAILURES = ("timeout", "error", "memory", "blocked", "output_limit")


def extract_code(solution_str: str) -> str:
    """The code in a response: its last ```python fenced block, else its last untagged
    fenced block, else the whole text."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(solution_str)]
    for wanted in (lambda tag: tag in _PYTHON_TAGS, lambda tag: tag == ""):
        chosen = [body for tag, body in blocks if wanted(tag)]
        if chosen:
            return chosen[-1]
    return solution_str


def compute_score(
    solution_str: str,
    ground_truth: str,
    extra_info: Optional[dict[str, Any]] = None,
    *,
    limits: SandboxLimits = REWARD_LIMITS,
) -> dict[str, float]:
    """Score 1.0 if the response's code followed by the tests in ``ground_truth`` runs to
    its end with status ``ok``, else 0.0.

    Besides ``score``, the dict flags why a run failed (each 0.0 or 1.0: ``timeout``,
    ``error``, ``memory``, ``blocked``, ``output_limit``), so that the logged means show
    what the policy's failures are, and gives ``wall_s``.
    """
    if not isinstance(ground_truth, str):
        raise TypeError(
            f"ground_truth must be Python test code as a str, got {type(ground_truth).__name__}"
        )
    token = secrets.token_hex(16)
    program = (
        f"{extract_code(solution_str)}\n\n"
        f"{ground_truth}\n\n"
        f"import sys as _sys\n_sys.stdout.flush()\n_sys.stdout.write('\\n{token}\\n')\n"
    )
    result = run_python(program, limits=limits)
    finished = result.status == "ok" and result.stdout.rstrip("\n").endswith(token)
    failure = "error" if result.status == "ok" and not finished else result.status
    flags = {name: float(failure == name) for name in _FAILURES}
    return {"score": 1.0 if finished else 0.0, **flags, "wall_s": result.wall_s}
