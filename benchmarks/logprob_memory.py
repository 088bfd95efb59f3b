"""Peak memory of log-probs on a real model: chunked LM head vs full float32 logits.

Measures, on SmolLM2-135M-Instruct (vocabulary 49,152, tied embeddings; fetched by
``make real-parts``), the memory one policy-worker call needs on top of what the process
already holds:

* ``compute_log_prob``: ``PolicyWorker.compute_log_prob`` on one micro-batch (no grad);
* ``update``: one update micro-batch, ``PolicyWorker._backward_mini_batch`` (forward, clipped
  PG loss with the logged entropy, backward; gradient checkpointing on, as memory-bound runs
  use), with the gradient buffers already allocated as after a previous micro-batch (the
  first micro-batch of a mini-batch adds the same 513 MiB of float32 gradients to both paths).

Each micro-batch holds ``--tokens`` tokens: sequences of 1,024 tokens (256 prompt + 768
response, random ids) packed into one row. ``direct`` is the previous code path (the model
returns ``[tokens, vocab]`` logits, then log-softmax); ``chunked`` is the default
(``score_responses(chunked=True)``). Every measurement runs in a fresh process on CPU: the
peak resident set size (``VmHWM``) is reset with ``/proc/self/clear_refs`` right before the
call, and the reported number is the peak minus the resident size just before it (glibc is
told to return freed blocks at once, see ``MALLOC_ENV``). The script also checks that both
paths give the same log-probs.

    python benchmarks/logprob_memory.py                     # 2k and 8k tokens
    python benchmarks/logprob_memory.py --tokens 2048       # one size
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# glibc keeps freed blocks below its (adaptive, up to 32 MiB) mmap threshold in the heap, so
# the resident size would include memory that is free; a fixed 64 KiB threshold maps every
# tensor-sized block and returns it on free, so the resident size follows live memory.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
SEQ_LEN, PROMPT_LEN = 1024, 256


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(model: str, tokens: int, phase: str, mode: str) -> dict:
    """One measurement in this process (the parent runs each in a fresh one)."""
    import torch
    from omegaconf import OmegaConf

    import rlflow
    from rlflow.data.batched_data_dict import BatchedDataDict
    from rlflow.models import packing
    from rlflow.utils.torch_functional import compute_position_ids
    from rlflow.workers import policy

    torch.set_num_threads(2)
    rows = tokens // SEQ_LEN
    cfg = rlflow.compose_config("grpo", overrides=[
        f"model.path={model}", f"data.max_prompt_length={PROMPT_LEN}",
        f"data.max_response_length={SEQ_LEN - PROMPT_LEN}",
        "actor.use_sequence_packing=true", f"actor.max_tokens_per_microbatch={tokens}",
        "actor.use_kl_loss=false", "actor.entropy_coeff=0.0",
        f"model.gradient_checkpointing={phase == 'update'}",
    ])
    if mode == "direct":
        policy.score_responses = functools.partial(packing.score_responses, chunked=False)
    worker = policy.PolicyWorker(OmegaConf.to_container(cfg, resolve=True), role="actor")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (rows, SEQ_LEN), generator=gen)
    mask = torch.ones_like(ids)
    batch = BatchedDataDict({
        "input_ids": ids, "attention_mask": mask, "position_ids": compute_position_ids(mask),
        "responses": ids[:, PROMPT_LEN:], "response_mask": mask[:, PROMPT_LEN:],
        "advantages": torch.randn(rows, SEQ_LEN - PROMPT_LEN, generator=gen),
    })
    # warm-up on a short slice, so one-off allocations (thread pools, kernels) are not counted
    worker.compute_log_prob(batch.slice(0, 1), micro_batch_size=1)
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current size
    start = time.perf_counter()
    if phase == "compute_log_prob":
        result = worker.compute_log_prob(batch, micro_batch_size=rows)["log_probs"]
    else:
        batch["old_log_probs"] = worker.compute_log_prob(batch, micro_batch_size=rows)["log_probs"]
        # gradient buffers as a previous micro-batch of the mini-batch leaves them
        for param in worker.model.parameters():
            param.grad = torch.zeros_like(param)
        Path("/proc/self/clear_refs").write_text("5")
        before = _rss_kib("VmRSS")
        start = time.perf_counter()
        worker._backward_mini_batch(batch)
        result = batch["old_log_probs"]
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    return {
        "tokens": tokens, "phase": phase, "mode": mode, "seconds": round(seconds, 1),
        "peak_above_start_mib": round((peak - before) / 1024), "rss_before_mib": round(before / 1024),
        "log_prob_sum": float(result.double().sum()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF model folder (default: the fetched SmolLM2-135M-Instruct)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--one", nargs=3, metavar=("TOKENS", "PHASE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        sys.path.insert(0, str(REPO))
        from tools.real_parts import ensure

        args.model = str(ensure("smollm2-135m-instruct"))
    if args.one:
        print(json.dumps(measure(args.model, int(args.one[0]), args.one[1], args.one[2])))
        return 0
    results = []
    for tokens in args.tokens:
        for phase in ("compute_log_prob", "update"):
            for mode in ("direct", "chunked"):
                proc = subprocess.run(
                    [sys.executable, __file__, "--model", args.model, "--one", str(tokens), phase, mode],
                    capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO), **MALLOC_ENV),
                )
                if proc.returncode != 0:
                    print(proc.stderr[-2000:], file=sys.stderr)
                    return 1
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                results.append(row)
                print(json.dumps(row), flush=True)
    print("\n| tokens | call | direct peak (MiB) | chunked peak (MiB) | chunked / direct | same log-probs |")
    print("|---|---|---|---|---|---|")
    for tokens in args.tokens:
        for phase in ("compute_log_prob", "update"):
            d, c = (next(r for r in results if (r["tokens"], r["phase"], r["mode"]) == (tokens, phase, m))
                    for m in ("direct", "chunked"))
            same = abs(d["log_prob_sum"] - c["log_prob_sum"]) <= 1e-6 * abs(d["log_prob_sum"])
            ratio = c["peak_above_start_mib"] / max(d["peak_above_start_mib"], 1)
            print(f"| {tokens} | {phase} | {d['peak_above_start_mib']} | {c['peak_above_start_mib']} | "
                  f"{ratio:.0%} | {'yes' if same else 'NO'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
