"""rlflow's demo GRPO step against the same work in one plain torch process, and TRL.

Three contenders, each in a fresh process, run one after another in this one invocation:

* ``rlflow``: ``python -m rlflow.main +recipe=grpo`` as a user runs it, through the Python
  API: Ray, one actor worker of 2 torch threads that samples with the model it trains and
  holds the reference too (``rollout.placement=auto``), rewards on the driver. In the
  synchronous loop only one role computes at a time, so that one process can use both cores.
* ``rlflow-fsdp2``: the same recipe with two FSDP actor ranks of one thread each
  (``FSDP2``: ``actor.num_workers=2 actor.torch_threads=1``), which gives it a rollout
  worker of its own and a weight sync through the object store every step.
* ``plain``: the same algorithm in one process with one torch thread and no Ray: the demo
  model samples ``rollout.n`` answers per prompt with HF ``generate``, the arithmetic rule
  scores them, a frozen copy gives reference log-probs, and one clipped policy-gradient step
  with the k3 KL loss follows. This is the floor for the work itself.
* ``trl``: TRL's ``GRPOTrainer`` on the same model, prompts and shapes, one torch thread like
  the plain loop (skipped with a note when ``trl`` is not importable).
* ``trl-2t``: the same with 2 torch threads, torch's default on 2 cores: the fair comparison
  for a configuration of rlflow that uses both cores.

Each contender reports the time from process start to the end of its first step, and the
median seconds per step over ``--steps`` steps after ``--warmup`` steps; the whole set is
repeated ``--runs`` times and the medians are printed with the ratios to ``plain``.

    python benchmarks/step_overhead.py                 # the numbers in docs/benchmarks.md
    python benchmarks/step_overhead.py --runs 1 --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

# Start-up is timed from here: the interpreter is up, nothing heavy is imported yet.
_START = time.perf_counter()
PROMPTS, SAMPLES, NEW_TOKENS = 32, 8, 4


def _result(first_step_s: float, step_times: list[float]) -> None:
    print("RESULT " + json.dumps({"first_step_s": first_step_s, "step_s": statistics.median(step_times)}), flush=True)


FSDP2 = ["actor.num_workers=2", "actor.torch_threads=1"]


def run_rlflow(args: argparse.Namespace, start: float, overrides: tuple[str, ...] = ()) -> None:
    import rlflow

    out = tempfile.mkdtemp(prefix="rlflow-bench-")
    cfg = rlflow.compose_config("grpo", overrides=[
        f"trainer.total_steps={args.warmup + args.steps + 1}", "trainer.progress_bar=false",
        f"trainer.output_dir={out}", "trainer.resume_mode=disable", *overrides,
    ])
    trainer = rlflow.build_trainer(cfg)
    try:
        trainer.step()
        first = time.perf_counter() - start
        for _ in range(args.warmup):
            trainer.step()
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            trainer.step()
            times.append(time.perf_counter() - t)
    finally:
        trainer.close()
    _result(first, times)


def _demo_parts():
    from rlflow.config.compose import compose_config
    from rlflow.data.rlhf_dataset import RLHFDataset, collate_fn
    from rlflow.demo.assets import resolve_demo_path
    from rlflow.models.loading import load_tokenizer

    cfg = compose_config("grpo")
    tokenizer = load_tokenizer(cfg.model)
    dataset = RLHFDataset(
        [resolve_demo_path(str(f)) for f in cfg.data.train_files], tokenizer,
        max_prompt_length=int(cfg.data.max_prompt_length),
    )
    return cfg, tokenizer, dataset, collate_fn, resolve_demo_path(cfg.model.path)


def run_plain(args: argparse.Namespace, start: float) -> None:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, GenerationConfig

    from rlflow.rewards.arithmetic import compute_score

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg, tokenizer, dataset, collate_fn, model_path = _demo_parts()
    policy = AutoModelForCausalLM.from_pretrained(model_path)
    ref = AutoModelForCausalLM.from_pretrained(model_path).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=float(cfg.actor.optim.lr), weight_decay=0.0)
    gen_cfg = GenerationConfig(
        max_new_tokens=NEW_TOKENS, do_sample=True, temperature=1.0, top_k=None, top_p=1.0,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )

    def response_log_probs(model, input_ids, attention_mask, width):
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        logits = logits[:, -width - 1 : -1].float()
        log_probs = torch.log_softmax(logits, -1)
        targets = input_ids[:, -width:]
        token_lp = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        return token_lp, entropy

    def step(index: int) -> None:
        rows = [dataset[(index * PROMPTS + i) % len(dataset)] for i in range(PROMPTS)]
        prompts = collate_fn(rows).repeat_interleave(SAMPLES)
        with torch.no_grad():
            out = policy.generate(
                input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"], generation_config=gen_cfg
            )
        width = prompts["input_ids"].shape[1]
        responses = out[:, width:]
        responses = F.pad(responses, (0, NEW_TOKENS - responses.shape[1]), value=tokenizer.pad_token_id)
        is_eos = (responses == tokenizer.eos_token_id).long()
        mask = ((is_eos.cumsum(-1) - is_eos) == 0).float()
        lengths = mask.sum(-1).long()
        texts = tokenizer.batch_decode([r[: int(n)] for r, n in zip(responses, lengths)], skip_special_tokens=True)
        scores = torch.tensor([
            compute_score(t, rm["ground_truth"]) for t, rm in zip(texts, prompts["reward_model"])
        ])
        grouped = scores.view(PROMPTS, SAMPLES)
        adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-6)).view(-1, 1)
        input_ids = torch.cat([prompts["input_ids"], responses], 1)
        attention_mask = torch.cat([prompts["attention_mask"], mask.long()], 1)
        with torch.no_grad():
            ref_lp, _ = response_log_probs(ref, input_ids, attention_mask, NEW_TOKENS)
        log_probs, entropy = response_log_probs(policy, input_ids, attention_mask, NEW_TOKENS)
        ratio = torch.exp(log_probs - log_probs.detach())
        pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
        kl = torch.exp(ref_lp - log_probs) - (ref_lp - log_probs) - 1
        loss = ((pg + float(cfg.actor.kl_loss_coef) * kl) * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        _ = (entropy * mask).sum().item() / mask.sum().item()

    step(0)
    first = time.perf_counter() - start
    for i in range(args.warmup):
        step(1 + i)
    times = []
    for i in range(args.steps):
        t = time.perf_counter()
        step(1 + args.warmup + i)
        times.append(time.perf_counter() - t)
    _result(first, times)


def run_trl(args: argparse.Namespace, start: float, threads: int = 1) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlflow.rewards.arithmetic import compute_score

    torch.set_num_threads(threads)
    cfg, tokenizer, dataset, _, model_path = _demo_parts()
    rows = [dataset[i] for i in range(len(dataset))]
    data = Dataset.from_list([
        {"prompt": tokenizer.decode(r["raw_prompt_ids"]), "ground_truth": r["reward_model"]["ground_truth"]}
        for r in rows
    ])

    def reward(completions, ground_truth, **_):
        return [compute_score(c, g) for c, g in zip(completions, ground_truth)]

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_a, **_k):
            stamps.append(time.perf_counter())

    total = 1 + args.warmup + args.steps
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"), per_device_train_batch_size=PROMPTS * SAMPLES,
        num_generations=SAMPLES, max_completion_length=NEW_TOKENS, max_steps=total, learning_rate=float(cfg.actor.optim.lr),
        beta=float(cfg.actor.kl_loss_coef), logging_steps=1000, save_strategy="no", report_to=[],
        use_cpu=True, bf16=False, temperature=1.0, seed=0, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_path), reward_funcs=reward, args=config,
        train_dataset=data, processing_class=tokenizer, callbacks=[Clock()],
    )
    trainer.train()
    times = [b - a for a, b in zip(stamps[args.warmup:], stamps[args.warmup + 1:])]
    _result(stamps[0] - start, times)


CONTENDERS = {
    "rlflow": run_rlflow,
    "rlflow-fsdp2": lambda args, start: run_rlflow(args, start, tuple(FSDP2)),
    "plain": run_plain,
    "trl": run_trl,
    "trl-2t": lambda args, start: run_trl(args, start, threads=2),
}


def measure(name: str, args: argparse.Namespace) -> dict | None:
    cmd = [sys.executable, __file__, "--contender", name, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    print(f"  {name}: no result ({tail[0][:200]})")
    return None


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--contender", choices=sorted(CONTENDERS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.contender:
        CONTENDERS[args.contender](args, _START)
        return 0
    try:
        import trl  # noqa: F401

        names = ["rlflow", "rlflow-fsdp2", "plain", "trl", "trl-2t"]
    except ImportError:
        print("trl is not installed: comparing rlflow with the plain loop only")
        names = ["rlflow", "rlflow-fsdp2", "plain"]
    results: dict[str, list[dict]] = {n: [] for n in names}
    for run in range(args.runs):
        for name in names:
            res = measure(name, args)
            if res is not None:
                results[name].append(res)
                print(f"run {run + 1} {name}: {res['step_s']:.3f} s/step, first step after {res['first_step_s']:.1f} s")
    print(f"\n{PROMPTS} prompts x {SAMPLES} samples, {NEW_TOKENS} new tokens, demo model; median of {args.runs} runs")
    print(f"{'':15} {'s/step':>8} {'x plain':>8} {'x trl':>6} {'first step s':>13}")
    summary = {n: (statistics.median(r["step_s"] for r in rs), statistics.median(r["first_step_s"] for r in rs))
               for n, rs in results.items() if rs}
    base = summary.get("plain", (float("nan"),))[0]
    trl = summary.get("trl", (float("nan"),))[0]
    for name, (step_s, first_s) in summary.items():
        print(f"{name:15} {step_s:8.3f} {step_s / base:8.2f} {step_s / trl:6.2f} {first_s:13.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
