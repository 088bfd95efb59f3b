"""Actor-update throughput: padded micro-batches vs dynamic batching vs sequence packing.

Packing is timed twice: with per-sequence attention (what the worker uses for sdpa models)
and with a 4-D block-diagonal mask over the whole packed row (the generic fallback).

One process, one ``PolicyWorker`` per mode (same random Llama weights, same ragged batch),
one mini-batch per update. Every mode gets the same token budget per forward pass: the
padded mode runs ``--micro-batch-size`` rows of full width, and dynamic batching and packing
use that many tokens as ``max_tokens_per_microbatch``. Throughput counts real tokens
(prompt + response, no padding) per second of ``update_policy`` wall time (median over
repeats; process CPU time is shown too, as a check on a shared, noisy machine). The modes are
timed round-robin after one untimed warm-up update each; the warm-up loss is printed per mode
as a check that all modes optimise the same objective.

    python benchmarks/actor_update_throughput.py            # defaults used in docs/benchmarks.md
    python benchmarks/actor_update_throughput.py --help
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, LlamaConfig

from rlflow.config.compose import compose_config
from rlflow.data.batched_data_dict import BatchedDataDict
from rlflow.utils.torch_functional import compute_position_ids
from rlflow.workers.policy import PolicyWorker

# "packing" keeps sequences apart with per-sequence sdpa (rlflow's default for sdpa models);
# "packing-mask" runs the same bins with a 4-D block-diagonal mask over the whole packed row.
MODES = ("padded", "dynamic", "packing", "packing-mask")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=64, help="responses per update")
    p.add_argument("--min-response", type=int, default=8)
    p.add_argument("--max-response", type=int, default=256)
    p.add_argument("--min-prompt", type=int, default=16)
    p.add_argument("--max-prompt", type=int, default=64)
    p.add_argument("--micro-batch-size", type=int, default=8, help="rows per padded micro-batch")
    p.add_argument("--repeats", type=int, default=3, help="timed updates per mode (after 1 warm-up)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared machine)")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("batch_size", "min_response", "min_prompt", "micro_batch_size", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.min_response > args.max_response or args.min_prompt > args.max_prompt:
        p.error("--min-* must not exceed the matching --max-*")
    return args


def make_model(root: str, args: argparse.Namespace) -> str:
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads, max_position_embeddings=args.max_prompt + args.max_response,
    )
    path = os.path.join(root, "bench-llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def make_batch(args: argparse.Namespace) -> BatchedDataDict:
    gen = torch.Generator().manual_seed(args.seed)
    n, pw, rw = args.batch_size, args.max_prompt, args.max_response
    prompts = torch.randint(args.min_prompt, args.max_prompt + 1, (n,), generator=gen)
    responses = torch.randint(args.min_response, args.max_response + 1, (n,), generator=gen)
    ids = torch.randint(0, args.vocab, (n, pw + rw), generator=gen)
    mask = torch.zeros(n, pw + rw, dtype=torch.long)
    for b in range(n):
        mask[b, pw - prompts[b] : pw] = 1
        mask[b, pw : pw + responses[b]] = 1
    return BatchedDataDict(
        input_ids=ids, attention_mask=mask, position_ids=compute_position_ids(mask),
        responses=ids[:, pw:], response_mask=mask[:, pw:].clone(),
        advantages=torch.randn(n, 1, generator=gen).expand(n, rw).contiguous(),
    )


def worker_config(model_dir: str, args: argparse.Namespace, mode: str) -> dict:
    cap = args.micro_batch_size * (args.max_prompt + args.max_response)
    overrides = [
        f"model.path={model_dir}", f"model.attn_implementation={args.attn}",
        f"actor.torch_threads={args.threads}",
        f"actor.ppo_micro_batch_size_per_worker={args.micro_batch_size}",
        f"actor.max_tokens_per_microbatch={cap}",
        f"actor.use_dynamic_bsz={mode == 'dynamic'}", f"actor.use_sequence_packing={mode.startswith('packing')}",
        "actor.use_kl_loss=false", "actor.optim.lr=1e-5",
        f"data.max_prompt_length={args.max_prompt}", f"data.max_response_length={args.max_response}",
    ]
    return OmegaConf.to_container(compose_config("grpo", overrides), resolve=True)


def plan_summary(worker: PolicyWorker, batch: BatchedDataDict) -> tuple[int, int]:
    """(micro-batches, tokens the forward passes compute, padding included) for one update."""
    micro = int(worker.cfg.actor.ppo_micro_batch_size_per_worker)
    layout, groups = worker.plan_micro_batches(batch, micro)
    lengths = batch["attention_mask"].sum(-1).tolist()
    if layout == "padded":
        return len(groups), batch.size * batch["input_ids"].shape[1]
    if layout == "unpadded":
        step = int(worker.cfg.actor.sequence_length_round)
        return len(groups), sum(len(g) * -(-max(lengths[i] for i in g) // step) * step for g in groups)
    return len(groups), int(sum(lengths))


def measure(model_dir: str, batch: BatchedDataDict, args: argparse.Namespace) -> list[dict]:
    """Build one worker per mode, warm each up, then time the modes round-robin so that load
    from other processes on the machine hits every mode alike."""
    workers = {
        mode: PolicyWorker(worker_config(model_dir, args, mode), role="actor", total_steps=args.repeats + 1)
        for mode in MODES
    }
    workers["packing-mask"].mask_kind = "bool" if args.attn == "sdpa" else "additive"
    first_loss = {mode: w.update_policy(batch, batch.size)["actor/loss"] for mode, w in workers.items()}
    wall: dict[str, list[float]] = {mode: [] for mode in MODES}
    cpu: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode, worker in workers.items():
            w0, c0 = time.perf_counter(), time.process_time()
            worker.update_policy(batch, batch.size)
            wall[mode].append(time.perf_counter() - w0)
            cpu[mode].append(time.process_time() - c0)
    real = int(batch["attention_mask"].sum())
    rows = []
    for mode, worker in workers.items():
        steps, computed = plan_summary(worker, batch)
        median = statistics.median(wall[mode])
        rows.append({
            "mode": mode, "micro_batches": steps, "computed_tokens": computed, "real_tokens": real,
            "median_s": median, "cpu_s": statistics.median(cpu[mode]),
            "tokens_per_s": real / median, "first_loss": first_loss[mode],
        })
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    batch = make_batch(args)
    with tempfile.TemporaryDirectory(prefix="rlflow-bench-") as root:
        model_dir = make_model(root, args)
        rows = measure(model_dir, batch, args)
    base, base_cpu = rows[0]["tokens_per_s"], rows[0]["cpu_s"]
    print(
        f"batch {args.batch_size} responses {args.min_response}-{args.max_response} tokens, prompts "
        f"{args.min_prompt}-{args.max_prompt}; Llama hidden {args.hidden} x {args.layers} layers, "
        f"vocab {args.vocab}, {args.attn}; {args.threads} threads; token budget per forward "
        f"{args.micro_batch_size * (args.max_prompt + args.max_response)}; median of {args.repeats}"
    )
    header = (
        f"| {'mode':12} | {'micro-batches':>13} | {'computed tokens':>15} | {'real tokens':>11} | "
        f"{'update s':>8} | {'CPU s':>6} | {'tokens/s':>8} | {'speed-up':>8} | {'speed-up CPU':>12} | "
        f"{'first loss':>11} |"
    )
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        print(
            f"| {r['mode']:12} | {r['micro_batches']:>13} | {r['computed_tokens']:>15} | "
            f"{r['real_tokens']:>11} | {r['median_s']:>8.2f} | {r['cpu_s']:>6.2f} | "
            f"{r['tokens_per_s']:>8.0f} | {r['tokens_per_s'] / base:>7.2f}x | "
            f"{base_cpu / r['cpu_s']:>11.2f}x | {r['first_loss']:>11.6f} |"
        )

if __name__ == "__main__":
    main()
