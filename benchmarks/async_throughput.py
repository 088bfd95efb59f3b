"""Throughput and sample efficiency of rollout.mode = sync, one_step_off and async.

``async-k`` is ``rollout.mode=async`` with ``rollout.max_weight_staleness=k``.

Each mode runs the GRPO demo in a fresh process (its own local Ray), one after another in
this one invocation, with one actor worker and one rollout worker, one torch thread each,
pinned to different cores: after the trainer is built, every thread of the rollout worker's
process is bound to core 0 and every thread of the actor worker's to core 1
(``os.sched_setaffinity``). The reference, reward and driver processes are not pinned.

Generation in sequences of ``rollout.micro_batch_size`` (``--gen-micro-batch``) makes it take
about as long as the rest of a sync step, the case where overlapping them pays. (Longer
``data.max_response_length`` does too, but the demo's short answers are then learnt far
more slowly than any step cap worth waiting for.) Each mode trains until the rolling mean
(over 3 steps) of ``reward/mean`` reaches ``--target`` or ``--max-steps`` steps have run.

Reported per mode:

* steady-state samples/s: responses trained per second of step time, steps after the first
  ``--warmup`` (start-up and the first generations excluded), and its ratio to sync;
* the mean phase times of a step (generation wait, actor update) in that window;
* sample efficiency: responses trained until the target reward was first reached.

    python benchmarks/async_throughput.py                       # the numbers in docs/benchmarks.md
    python benchmarks/async_throughput.py --max-steps 20        # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

# The overlapping modes train on responses sampled one or more weight syncs ago, and correct
# the loss for it with truncated importance sampling (docs/off_policy.md); without it they
# needed 1.5-2x the samples of sync to reach the target. async runs with the staleness bound
# of one_step_off and with more room to run ahead; "async-2-rollout" takes the old log-probs
# from the rollout (the PPO ratio against the sampling weights) instead of an extra forward
# pass; "async-2-partial" generates in one-token segments (partial rollouts).
TIS = "actor.off_policy.correction=tis"
MODE_OVERRIDES = {
    "sync": [],
    "one_step_off": ["rollout.mode=one_step_off", "rollout.max_weight_staleness=1", TIS],
    "async-1": ["rollout.mode=async", "rollout.max_weight_staleness=1", TIS],
    "async-2": ["rollout.mode=async", "rollout.max_weight_staleness=2", TIS],
    "async-2-rollout": ["rollout.mode=async", "rollout.max_weight_staleness=2", "actor.recompute_old_log_prob=rollout"],
    "async-2-partial": [
        "rollout.mode=async", "rollout.max_weight_staleness=2", TIS,
        "rollout.partial_rollout=true", "rollout.partial_segment_tokens=1",
    ],
}
MODES = tuple(MODE_OVERRIDES)


def pin(pid: int, core: int) -> None:
    """Bind every thread of process ``pid`` to ``core`` (the affinity of a pid alone covers
    only its main thread)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), {core})
        except ProcessLookupError:  # a thread that just ended
            pass


def run_mode(args: argparse.Namespace) -> None:
    import rlflow

    out = tempfile.mkdtemp(prefix=f"rlflow-bench-{args.mode}-")
    cfg = rlflow.compose_config("grpo", overrides=[
        f"trainer.output_dir={out}", "trainer.progress_bar=false", "trainer.resume_mode=disable",
        f"trainer.total_steps={args.max_steps}", "trainer.save_freq=0", "cluster.num_cpus=2",
        "actor.num_workers=1", "rollout.num_workers=1", "actor.torch_threads=1", "rollout.torch_threads=1",
        "rollout.placement=split",  # every mode with a rollout worker pinned to its own core
        f"data.max_response_length={args.response_length}",
        f"rollout.micro_batch_size={args.gen_micro_batch}",
        f"rollout.async_prompts_per_call={args.prompts_per_call}", *MODE_OVERRIDES[args.mode], *args.override,
    ])
    trainer = rlflow.build_trainer(cfg)
    try:
        pin(trainer.groups["rollout"].workers_info()[0]["pid"], 0)
        pin(trainer.groups["actor"].workers_info()[0]["pid"], 1)
        rows, rewards = [], []
        for _ in range(args.max_steps):
            m = trainer.step()
            rewards.append(m["reward/mean"])
            rows.append({
                "step": m["step"], "reward": m["reward/mean"], "samples": m["train/num_responses"],
                "step_s": m["timing/step_s"], "gen_s": m.get("timing/gen_s", 0.0),
                "update_s": m.get("timing/update_actor_s", 0.0), "lag": m["rollout/weight_lag"],
            })
            recent = rewards[-3:]
            if len(recent) == 3 and sum(recent) / 3 >= args.target:
                break
    finally:
        trainer.close()
    print("RESULT " + json.dumps(rows), flush=True)


def summarise(mode: str, rows: list[dict], warmup: int, target: float) -> dict:
    steady = rows[warmup:]
    seconds = sum(r["step_s"] for r in steady)
    rewards = [r["reward"] for r in rows]
    reached = next(
        (i for i in range(2, len(rows)) if sum(rewards[i - 2 : i + 1]) / 3 >= target), None
    )
    return {
        "mode": mode,
        "steps": len(rows),
        "samples_per_s": sum(r["samples"] for r in steady) / seconds if seconds else float("nan"),
        "gen_s": sum(r["gen_s"] for r in steady) / max(1, len(steady)),
        "update_s": sum(r["update_s"] for r in steady) / max(1, len(steady)),
        "step_s": seconds / max(1, len(steady)),
        "lag": sum(r["lag"] for r in steady) / max(1, len(steady)),
        "samples_to_target": None if reached is None else int(sum(r["samples"] for r in rows[: reached + 1])),
        "steps_to_target": None if reached is None else reached + 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, help="run one mode (the parent runs each in a child)")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of samples/s")
    parser.add_argument("--response-length", type=int, default=4)
    parser.add_argument("--gen-micro-batch", type=int, default=16,
                        help="rollout.micro_batch_size: sequences per HF generate call")
    parser.add_argument("--prompts-per-call", type=int, default=4,
                        help="rollout.async_prompts_per_call: prompts per generate call in async mode")
    parser.add_argument("--target", type=float, default=0.5, help="reward/mean to reach (rolling mean of 3)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="the modes to compare (sync first: the ratios are to it)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every mode (repeatable)")
    args = parser.parse_args()
    if args.mode:
        run_mode(args)
        return

    results = []
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--mode", mode, "--max-steps", str(args.max_steps),
               "--response-length", str(args.response_length), "--gen-micro-batch", str(args.gen_micro_batch),
               "--prompts-per-call", str(args.prompts_per_call),
               "--target", str(args.target), *(f"--override={o}" for o in args.override)]
        env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"{mode} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        results.append(summarise(mode, json.loads(lines[-1][len("RESULT "):]), args.warmup, args.target))
        print(f"{mode}: done ({results[-1]['steps']} steps)", flush=True)

    base = results[0]["samples_per_s"]
    base_samples = results[0]["samples_to_target"]
    print(f"\nsteady state = steps after the first {args.warmup}; target = rolling mean (3 steps) of "
          f"reward/mean >= {args.target}; data.max_response_length={args.response_length}, "
          f"rollout.micro_batch_size={args.gen_micro_batch}")
    header = ("mode", "steps", "samples/s", "vs sync", "step s", "gen wait s", "update s", "mean lag",
              "samples to target", "vs sync", "steps to target")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in results:
        to_target = "not reached" if r["samples_to_target"] is None else str(r["samples_to_target"])
        ratio = "-" if r["samples_to_target"] is None or not base_samples else f"{r['samples_to_target'] / base_samples:.2f}x"
        steps_to = "-" if r["steps_to_target"] is None else str(r["steps_to_target"])
        print(f"| {r['mode']} | {r['steps']} | {r['samples_per_s']:.1f} | {r['samples_per_s'] / base:.2f}x | "
              f"{r['step_s']:.3f} | {r['gen_s']:.3f} | {r['update_s']:.3f} | {r['lag']:.2f} | {to_target} | {ratio} | {steps_to} |")


if __name__ == "__main__":
    main()
