"""``python -m rlflow.data_engine +recipe=NAME key=value ...``: build DPO pairs from a model.

Recipes live in ``recipes/data_engine/``. ``--cfg`` prints the composed config. Errors print
one line and exit with status 2 (RLFLOW_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    from rlflow.main import user_message

    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    try:
        from rlflow.config.compose import available_recipes, compose_config, to_yaml
        from rlflow.data_engine.config import DataEngineRunConfig

        if "--list-recipes" in args:
            print("\n".join(available_recipes("data_engine")))
            return 0
        overrides = [a for a in args if a != "--cfg"]
        cfg = compose_config(overrides=overrides, schema=DataEngineRunConfig, recipe_subdir="data_engine")
        if "--cfg" in args:
            print(to_yaml(cfg))
            return 0
        from rlflow.data_engine.engine import run_data_engine

        run_data_engine(cfg)
        return 0
    except KeyboardInterrupt:
        print("rlflow.data_engine: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI boundary turns every failure into one line
        if os.environ.get("RLFLOW_DEBUG", "") not in ("", "0"):
            raise
        print(f"rlflow.data_engine: error: {user_message(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
