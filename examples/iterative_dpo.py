"""Iterative DPO on the demo: each round samples from the current policy with the data
engine, pairs correct against wrong answers, trains DPO on them and exports the new policy.

    python examples/iterative_dpo.py --rounds 2 --work_dir /tmp/iterative_dpo

Prints the greedy accuracy on the held-out demo prompts before training and after each round.
"""

from __future__ import annotations

import argparse
import os

import rlflow
from rlflow.config.compose import compose_config
from rlflow.data_engine.config import DataEngineRunConfig
from rlflow.data_engine.engine import run_data_engine
from rlflow.demo.assets import resolve_demo_path
from rlflow.evaluate import greedy_accuracy
from rlflow.export import export_from_actor_group

HELD_OUT = "demo:arithmetic/test.parquet"


def run_round(policy: str, round_dir: str, args: argparse.Namespace) -> str:
    run_data_engine(compose_config("arithmetic", [
        f"model.path={policy}", f"engine.work_dir={round_dir}/engine", f"engine.num_samples={args.num_samples}",
        f"engine.max_prompts={args.prompts}", "engine.pairing.strategy=margin",
        f"engine.pairing.max_pairs_per_prompt={args.pairs_per_prompt}", "engine.progress_bar=false",
    ], schema=DataEngineRunConfig, recipe_subdir="data_engine"))
    cfg = rlflow.compose_config("dpo", [
        f"model.path={policy}", f"data.train_files=[{round_dir}/engine/output/train.parquet]",
        "data.val_files=[demo:arithmetic_preference/test.parquet]", f"trainer.total_steps={args.dpo_steps}",
        f"trainer.output_dir={round_dir}/dpo", "trainer.progress_bar=false",
    ])
    trainer = rlflow.build_trainer(cfg)
    try:
        trainer.fit()
        return export_from_actor_group(trainer.groups["actor"], cfg, os.path.join(round_dir, "policy"))
    finally:
        trainer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work_dir", default="outputs/iterative_dpo")
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--num_samples", type=int, default=8)
    parser.add_argument("--pairs_per_prompt", type=int, default=4)
    parser.add_argument("--dpo_steps", type=int, default=60)
    args = parser.parse_args()
    held_out = [resolve_demo_path(HELD_OUT)]
    policy = resolve_demo_path("demo:tiny-char-lm")
    print(f"round 0 (initial policy): greedy accuracy {greedy_accuracy(policy, held_out):.3f}", flush=True)
    for round_idx in range(1, args.rounds + 1):
        policy = run_round(policy, os.path.abspath(os.path.join(args.work_dir, f"round_{round_idx}")), args)
        print(f"round {round_idx}: greedy accuracy {greedy_accuracy(policy, held_out):.3f} ({policy})", flush=True)


if __name__ == "__main__":
    main()
