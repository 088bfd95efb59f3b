"""A ``python`` tool for agents: run code in the sandbox, answer with a short observation.

The docstring of :func:`python` is written for ``transformers.utils.get_json_schema``,
which turns it into the JSON schema a chat template's ``tools`` argument takes. The
observation is kept short because it goes back into the model's context: long output is
cut in the middle, where it is least likely to matter.
"""

from __future__ import annotations

from rlflow.agents.sandbox import SandboxLimits, SandboxResult, run_python
from rlflow.agents.sandbox_child import BLOCKED_MARKER

TOOL_LIMITS = SandboxLimits(cpu_time_s=5.0, wall_time_s=10.0, memory_mb=512)
MAX_OBSERVATION_CHARS = 2000


def python(code: str) -> str:
    """Run Python code in an isolated sandbox and return what it printed.

    The code runs as a fresh script with no network access, a 10 second time limit and
    512 MB of memory; files can be written only in its working directory. Use print() to
    see results.

    Args:
        code: The Python source code to run, as a complete script.

    Returns:
        The standard output of the script, or a description of the error that stopped it.
    """
    return observation(run_python(code, limits=TOOL_LIMITS))


def observation(result: SandboxResult) -> str:
    """The text an agent sees for ``result``."""
    out = result.stdout
    if result.status == "ok":
        text = out if out.strip() else "(no output)"
    elif result.status == "timeout":
        text = f"timeout: the code did not finish in time\n{out}"
    elif result.status == "memory":
        text = f"error: memory limit exceeded\n{out}"
    elif result.status == "output_limit":
        text = f"error: too much output, the run was stopped\n{out}"
    elif result.status == "blocked":
        text = f"blocked: {_blocked_operation(result.stderr)} is not allowed in the sandbox\n{out}"
    else:
        text = f"{out}error:\n{result.stderr.strip() or f'exit status {result.returncode}'}"
    return _shorten(text.rstrip("\n") if result.status != "ok" else text, MAX_OBSERVATION_CHARS)


def _blocked_operation(stderr: str) -> str:
    for line in reversed(stderr.splitlines()):
        if line.startswith(BLOCKED_MARKER):
            return line[len(BLOCKED_MARKER):].lstrip(": ").split(" ", 1)[0]
    return "an operation"


def _shorten(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    half = (limit - 40) // 2
    return f"{text[:half]}\n... ({len(text) - 2 * half} characters cut) ...\n{text[-half:]}"
