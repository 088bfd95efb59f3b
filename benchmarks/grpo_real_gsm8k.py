"""GRPO on a real model and real data: does the reward go up, and how fast does it run?

Model: SmolLM2-135M-Instruct (``make real-parts``). Task: the calculator steps of real GSM8K
solutions. Every GSM8K answer marks its arithmetic as ``<<48/2=24>>``; each such step with at
most two operators, integer operands and an integer result becomes one short-answer prompt,
"Calculate 48/2. Reply with the number only.", whose reward is 1 when the last number of
the response equals the result (the GSM8K scorer's flexible mode) and 0 otherwise. Training
prompts come from the GSM8K rows of rlflow's train split, held-out prompts from its test
split (no GSM8K row is in both). Responses get 12 tokens, so an answer that does not come
straight away is cut off.

The held-out reward is measured before the first step and after the last, twice: greedy, and
sampled at temperature 1 like the training rollouts (one response per prompt); steps, wall
time and tokens/s come from the trainer's metrics.

    python benchmarks/grpo_real_gsm8k.py                       # 16 steps, lr 1e-5
    python benchmarks/grpo_real_gsm8k.py --steps 2 --val 16    # quick look
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATA_SOURCE = "gsm8k/calculator"
INSTRUCTION = "Reply with the number only."
_STEP = re.compile(r"<<([^=<>]+)=([^<>]+)>>")
_SIMPLE = re.compile(r"\d+(?:\s*[-+*/]\s*\d+){1,2}")


def calculator_rows(parquet: Path, split: str) -> list[dict]:
    """One verl-schema row per distinct simple calculator step of the GSM8K answers."""
    import pandas as pd

    rows, seen = [], set()
    for info in pd.read_parquet(parquet)["extra_info"]:
        for expr, result in _STEP.findall(info["answer"]):
            expr, result = expr.strip(), result.strip()
            if not _SIMPLE.fullmatch(expr) or not re.fullmatch(r"-?\d+", result) or expr in seen:
                continue
            seen.add(expr)
            rows.append({
                "data_source": DATA_SOURCE,
                "prompt": [{"role": "user", "content": f"Calculate {expr}. {INSTRUCTION}"}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": result},
                "extra_info": {"split": split, "index": len(rows), "expression": expr},
            })
    return rows


def short_answer(data_source, solution_str, ground_truth, extra_info=None) -> float:
    from rlflow.rewards import gsm8k

    return gsm8k.compute_score(solution_str, ground_truth, method="flexible")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--val", type=int, default=128, help="held-out prompts")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    args = parser.parse_args()

    import pandas as pd

    import rlflow
    from tools.real_parts import ensure

    model, gsm8k_dir = ensure("smollm2-135m-instruct"), ensure("gsm8k")
    out = Path(args.out or tempfile.mkdtemp(prefix="grpo-real-gsm8k-"))
    out.mkdir(parents=True, exist_ok=True)
    train = calculator_rows(gsm8k_dir / "train.parquet", "train")
    test = calculator_rows(gsm8k_dir / "test.parquet", "test")[: args.val]
    pd.DataFrame(train).to_parquet(out / "train.parquet")
    pd.DataFrame(test).to_parquet(out / "test.parquet")
    print(f"{len(train)} train prompts, {len(test)} held-out prompts -> {out}", flush=True)

    cfg = rlflow.compose_config("grpo", overrides=[
        f"model.path={model}",
        f"data.train_files=[{out / 'train.parquet'}]",
        f"data.val_files=[{out / 'test.parquet'}]",
        "data.train_batch_size=8",
        "data.max_prompt_length=64",
        "data.max_response_length=12",
        "rollout.n=4",
        "actor.num_workers=1",
        "actor.ppo_mini_batch_size=8",
        "actor.ppo_micro_batch_size_per_worker=32",
        "actor.use_kl_loss=false",
        f"actor.optim.lr={args.lr}",
        f"trainer.total_steps={args.steps}",
        # held-out rewards are measured here, greedy and sampled, not inside fit()
        f"trainer.test_freq={args.steps + 1}", "trainer.val_before_train=false",
        "trainer.progress_bar=false",
        f"trainer.output_dir={out / 'run'}",
    ])
    start = time.perf_counter()
    trainer = rlflow.build_trainer(cfg, reward_fn=short_answer)

    def held_out(temperature: float) -> float:
        """Held-out reward: greedy (0) or sampled like the training rollouts (1)."""
        trainer.cfg.rollout.val_temperature = temperature
        return trainer.validate()["val/reward/mean"]

    try:
        before = {t: held_out(t) for t in (0.0, 1.0)}
        history = trainer.fit()
        after = {t: held_out(t) for t in (0.0, 1.0)}
    finally:
        trainer.close()
    wall = time.perf_counter() - start
    steps = [row for row in history if "timing/step_s" in row]
    train_s = sum(row["timing/step_s"] for row in steps)
    summary = {
        "held_out_greedy_before": round(before[0.0], 3),
        "held_out_greedy_after": round(after[0.0], 3),
        "held_out_sampled_before": round(before[1.0], 3),
        "held_out_sampled_after": round(after[1.0], 3),
        "train_reward_first_3_steps": round(sum(r["reward/mean"] for r in steps[:3]) / len(steps[:3]), 3),
        "train_reward_last_3_steps": round(sum(r["reward/mean"] for r in steps[-3:]) / len(steps[-3:]), 3),
        "steps": len(steps),
        "step_s_mean": round(train_s / len(steps), 1),
        "tokens_per_s_mean": round(sum(r["throughput/tokens_per_s"] for r in steps) / len(steps), 1),
        "wall_s_total": round(wall, 1),
    }
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
