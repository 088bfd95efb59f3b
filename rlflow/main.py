"""Command line: ``python -m rlflow.main +recipe=grpo key=value ...`` (Hydra override syntax).

``--cfg`` prints the composed config and exits. Errors in the user's config, data or cluster
print one line and exit with status 2; set RLFLOW_DEBUG=1 for the full traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

USAGE = """usage: python -m rlflow.main [+recipe=NAME] [key=value ...] [--cfg]

  +recipe=NAME   a recipe from recipes/ (grpo, ...); see --list-recipes
  key=value      Hydra overrides, e.g. rollout.n=8 actor.optim.lr=1e-6 data.train_files=[a.parquet]
  --cfg          print the composed config and exit
  --list-recipes print the available recipes and exit
"""


def _causes(exc: BaseException):
    """``exc`` and what it wraps: ``__cause__`` (a worker error wraps Ray's) and Ray's ``cause``
    (the exception the worker raised)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        cause = getattr(exc, "cause", None)
        exc = cause if isinstance(cause, BaseException) else exc.__cause__


def user_error(exc: BaseException):
    """The ``RLFlowError`` that ``exc`` is or wraps (also one raised inside a Ray worker), or None."""
    from rlflow.errors import RLFlowError

    # The innermost: Ray's wrapper of a worker's error is an instance of the error's class too.
    found = [err for err in _causes(exc) if isinstance(err, RLFlowError) and str(err).strip()]
    return found[-1] if found else None


def user_message(exc: BaseException) -> str:
    """The one line to show for an exception, unwrapping errors raised inside Ray workers."""
    found = user_error(exc)
    if found is not None:
        return str(found).strip().splitlines()[0]
    cause = getattr(exc, "cause", None)  # RayTaskError / RayActorError carry the original error
    if isinstance(cause, BaseException) and cause is not exc:
        return user_message(cause)
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def run_summary(history: list, output_dir: str) -> str:
    """One line at the end of a run: how the reward moved, and where the metrics are."""
    rewards = [row["reward/mean"] for row in history if row.get("reward/mean") is not None]
    steps = sum(1 for row in history if row.get("step", 0) > 0)  # a step-0 row is validation only
    if not rewards:
        return f"[rlflow] done: {steps} steps; metrics in {output_dir}/metrics.jsonl"
    head, tail = rewards[:10], rewards[-10:]
    return (
        f"[rlflow] done: {steps} steps; reward/mean {sum(head) / len(head):.3f} over the first "
        f"{len(head)} steps -> {sum(tail) / len(tail):.3f} over the last {len(tail)}; "
        f"metrics in {output_dir}/metrics.jsonl"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    debug = os.environ.get("RLFLOW_DEBUG", "") not in ("", "0")
    try:
        from rlflow.config.compose import available_recipes, compose_config, to_yaml

        if "--list-recipes" in args:
            print("\n".join(available_recipes()))
            return 0
        show_cfg = "--cfg" in args
        overrides = [a for a in args if a != "--cfg"]
        unknown_flags = [a for a in overrides if a.startswith("-")]
        if unknown_flags:
            print(f"rlflow: error: unknown option {unknown_flags[0]} (see --help)", file=sys.stderr)
            return 2
        cfg = compose_config(overrides=overrides)
        if show_cfg:
            print(to_yaml(cfg))
            return 0
        from rlflow.api import build_trainer

        trainer = build_trainer(cfg)
        try:
            history = trainer.fit()
        finally:
            trainer.close()
        print(run_summary(history, trainer.output_dir))
        return 0
    except KeyboardInterrupt:
        print("rlflow: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI boundary turns every failure into one line
        if debug:
            raise
        known = user_error(exc) is not None or isinstance(exc, (ValueError, FileNotFoundError, TypeError))
        print(f"rlflow: error: {user_message(exc)}", file=sys.stderr)
        if not known:
            print("rlflow: set RLFLOW_DEBUG=1 for the full traceback", file=sys.stderr)
        return 2 if known else 1


if __name__ == "__main__":
    sys.exit(main())
