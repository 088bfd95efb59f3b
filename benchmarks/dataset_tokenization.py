"""Dataset tokenisation throughput: rlflow's RLHFDataset vs a straightforward per-row pipeline.

What is timed, per tokenizer, on the same parquet file (verl schema, chat-message prompts):

* rlflow: ``RLHFDataset(path, tokenizer, max_prompt_length=L)``: parquet read, chat-template
  rendering, length filter and tokenisation, batched through the fast tokenizer; once with
  ``filter_overlong_prompts_workers=1`` and once with 2.
* straightforward: ``datasets.Dataset.from_parquet`` (fresh cache folder), ``.filter`` with
  ``len(tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True,
  return_dict=False)) <= L`` and ``.map`` tokenising each row the same way, ``num_proc=1``
  (``return_dict=False`` because transformers 5 returns a dict by default; datasets 5 runs
  ``num_proc=1`` in one pool worker process, as verl's default does). Being ~10x slower,
  it runs on the first ``--slow-rows`` rows only; throughput is compared in rows/s.

Speed-up, wall: best rlflow rows/s over straightforward rows/s. Speed-up, CPU time: the same
with CPU seconds per row (all threads and child processes), which is less sensitive to other load
on a shared machine; the fast tokenizer's batch encoding uses several cores, so on an idle
machine the wall speed-up is the larger one.

Both paths must keep the same rows with the same token ids (checked on the slow path's rows).

Tokenizers, both built locally (no download) and loaded with ``from_pretrained``:

* ``demo-char``: rlflow's demo character-level tokenizer, on arithmetic prompts (2-40 terms, 4-160 characters);
* ``bpe-32k``: a byte-level BPE (vocab 32k, ChatML template) trained here on 50k rows of the
  synthetic text, on pseudo-natural-language prompts (lognormal lengths, median ~60 words, some with a
  system message).

Run from the repository root (about 3-4 minutes on 2 cores)::

    python benchmarks/dataset_tokenization.py            # 200k rows, 20k for the slow path
    python benchmarks/dataset_tokenization.py --rows 20000 --slow-rows 2000   # quick look
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ----------------------------------------------------------------------------- synthetic data


def arithmetic_prompts(n: int, rng: np.random.Generator) -> list[list[dict]]:
    """Expressions of 2-40 terms in the demo tokenizer's alphabet (one token per character)."""
    terms = rng.integers(2, 41, size=n)
    numbers = rng.integers(0, 1000, size=int(terms.sum()))
    ops = rng.choice(np.array(list("+-*")), size=int(terms.sum()))
    prompts, k = [], 0
    for t in terms:
        parts = []
        for j in range(t):
            parts.append(str(numbers[k + j]))
            parts.append(str(ops[k + j]) if j < t - 1 else "=")
        k += t
        prompts.append([{"role": "user", "content": "".join(parts)}])
    return prompts


def text_prompts(n: int, rng: np.random.Generator) -> list[list[dict]]:
    """Pseudo-English prompts: Zipf-distributed made-up words, lognormal lengths."""
    syllables = [
        "ka",
        "lo",
        "mi",
        "ne",
        "ru",
        "sa",
        "ti",
        "vo",
        "ze",
        "an",
        "or",
        "el",
        "is",
        "um",
        "qu",
        "th",
        "st",
        "pr",
        "be",
        "do",
        "fu",
        "gi",
        "ha",
        "je",
        "ly",
        "ph",
        "ch",
        "wa",
        "xe",
        "yo",
        "ing",
        "ed",
    ]
    sizes = rng.integers(1, 6, size=60_000)
    vocab = sorted({"".join(rng.choice(syllables, size=k)) for k in sizes})
    # Capitalised variants, as sentence starts and names have them.
    vocab += [w.capitalize() for w in vocab[::7]]
    vocab += [",", ".", "?", "1", "42", "2024", "3.14"]
    probs = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    probs /= probs.sum()
    words_per_prompt = np.clip(rng.lognormal(mean=np.log(60), sigma=0.8, size=n), 3, 1500).astype(int)
    word_ids = rng.choice(len(vocab), size=int(words_per_prompt.sum()), p=probs)
    words = np.array(vocab, dtype=object)[word_ids]
    has_system = rng.random(n) < 0.3
    prompts, k = [], 0
    for i, count in enumerate(words_per_prompt):
        content = " ".join(words[k : k + count])
        k += count
        messages = [{"role": "user", "content": content}]
        if has_system[i]:
            messages.insert(0, {"role": "system", "content": "You are a helpful assistant. Answer briefly."})
        prompts.append(messages)
    return prompts


def write_verl_parquet(path: Path, prompts: list[list[dict]], data_source: str) -> None:
    rows = {
        "data_source": [data_source] * len(prompts),
        "prompt": prompts,
        "ability": ["synthetic"] * len(prompts),
        "reward_model": [{"style": "rule", "ground_truth": "0"}] * len(prompts),
        "extra_info": [{"split": "train", "index": i} for i in range(len(prompts))],
    }
    pq.write_table(pa.Table.from_pydict(rows), path)


# ----------------------------------------------------------------------------- tokenizers


def save_demo_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    from rlflow.demo.assets import build_demo_tokenizer

    build_demo_tokenizer().save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def train_bpe_tokenizer(folder: Path, prompts: list[list[dict]], vocab_size: int = 32000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = (m["content"] for messages in prompts for m in messages)
    backend.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=32768
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


# ----------------------------------------------------------------------------- the two paths


def _cpu_seconds() -> float:
    # Children count too: datasets 5 runs ``num_proc=1`` in one pool worker process.
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Clock:
    """Wall time and CPU time (all threads, finished child processes included) of a block."""

    def __enter__(self) -> "Clock":
        self._wall, self._cpu = time.perf_counter(), _cpu_seconds()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = _cpu_seconds() - self._cpu


def time_rlflow(path: Path, tokenizer, max_len: int, workers: int):
    from rlflow.data.rlhf_dataset import RLHFDataset

    with Clock() as clock:
        ds = RLHFDataset(
            str(path), tokenizer, max_prompt_length=max_len, filter_overlong_prompts_workers=workers
        )
    return clock, ds


def time_straightforward(path: Path, tokenizer, max_len: int, cache_dir: Path):
    import datasets

    datasets.disable_progress_bars()
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    with Clock() as clock:
        ds = datasets.Dataset.from_parquet(str(path), cache_dir=str(cache_dir))
        ds = ds.filter(
            lambda row: (
                len(
                    tokenizer.apply_chat_template(
                        row["prompt"], add_generation_prompt=True, return_dict=False
                    )
                )
                <= max_len
            ),
            num_proc=1,
        )
        ds = ds.map(
            lambda row: {
                "input_ids": tokenizer.apply_chat_template(
                    row["prompt"], add_generation_prompt=True, return_dict=False
                )
            },
            num_proc=1,
        )
    # datasets sets TOKENIZERS_PARALLELISM=false in the C environment for its worker and never
    # undoes it (os.environ no longer shows it), which would leave every later batch encoding in
    # this process single-threaded. Undo it so the next measurements start from the same state.
    if before is None:
        os.unsetenv("TOKENIZERS_PARALLELISM")
    else:
        os.putenv("TOKENIZERS_PARALLELISM", before)
    return clock, ds


def check_same_rows(fast_ds, slow_ds, slow_rows: int) -> None:
    """The rlflow dataset's rows among the first ``slow_rows`` equal the slow path's, id for id."""
    fast_ids = []
    for j in range(len(fast_ds)):
        if fast_ds._index[j] >= slow_rows:
            break
        fast_ids.append(fast_ds[j]["raw_prompt_ids"])
    slow_ids = slow_ds["input_ids"]
    if fast_ids != slow_ids:
        raise SystemExit(
            f"MISMATCH: rlflow kept {len(fast_ids)} rows, the straightforward path {len(slow_ids)}"
        )


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows per synthetic dataset")
    parser.add_argument(
        "--slow-rows", type=int, default=20_000, help="rows given to the straightforward path"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="keep files here instead of a temp folder")
    args = parser.parse_args()
    if args.slow_rows > args.rows:
        parser.error("--slow-rows must not exceed --rows")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="rlflow-bench-tok-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    try:
        setups = []
        t = time.perf_counter()
        arith = arithmetic_prompts(args.rows, rng)
        setups.append(("demo-char", "arithmetic", arith, lambda: save_demo_tokenizer(work / "demo_tok"), 128))
        text = text_prompts(args.rows, rng)
        setups.append(
            ("bpe", "synthetic_text", text, lambda: train_bpe_tokenizer(work / "bpe_tok", text[:50_000]), 256)
        )
        print(f"generated 2 x {args.rows} prompts in {time.perf_counter() - t:.1f}s", flush=True)

        load_before = os.getloadavg()[0]
        results = []
        for name, source, prompts, make_tokenizer, max_len in setups:
            full = work / f"{name}.parquet"
            head = work / f"{name}-head.parquet"
            write_verl_parquet(full, prompts, source)
            write_verl_parquet(head, prompts[: args.slow_rows], source)
            tokenizer = make_tokenizer()
            if len(tokenizer) >= 1000:
                name = f"{name}-{len(tokenizer) // 1000}k"
            fast = {}
            for workers in (1, 2):
                clock, ds = time_rlflow(full, tokenizer, max_len, workers)
                fast[workers] = clock
                print(
                    f"[{name}] rlflow workers={workers}: {args.rows} rows in {clock.wall:.2f}s wall, "
                    f"{clock.cpu:.2f}s CPU ({args.rows / clock.wall:,.0f} rows/s), "
                    f"kept {len(ds)}, dropped {ds.num_dropped}",
                    flush=True,
                )
            cache = work / f"hf-cache-{name}"
            shutil.rmtree(cache, ignore_errors=True)
            slow, slow_ds = time_straightforward(head, tokenizer, max_len, cache)
            print(
                f"[{name}] straightforward: {args.slow_rows} rows in {slow.wall:.2f}s wall, {slow.cpu:.2f}s CPU "
                f"({args.slow_rows / slow.wall:,.0f} rows/s), kept {len(slow_ds)}",
                flush=True,
            )
            check_same_rows(ds, slow_ds, args.slow_rows)
            results.append((name, max_len, float(ds._lengths.float().mean()), fast, slow))

        print()
        print(
            f"python {platform.python_version()}, {os.cpu_count()} CPU cores, rows={args.rows}, "
            f"slow-path rows={args.slow_rows}, 1-min load average {load_before:.1f} before / "
            f"{os.getloadavg()[0]:.1f} after"
        )
        print(
            "| tokenizer | max_prompt_length | mean kept prompt tokens | rlflow rows/s, 1 worker "
            "| rlflow rows/s, 2 workers | straightforward rows/s | speed-up, wall | speed-up, CPU time |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for name, max_len, mean_tokens, fast, slow in results:
            best = min(fast.values(), key=lambda c: c.wall)
            fast_rate = {w: args.rows / c.wall for w, c in fast.items()}
            slow_rate = args.slow_rows / slow.wall
            cpu_ratio = (slow.cpu / args.slow_rows) / (best.cpu / args.rows)
            print(
                f"| {name} | {max_len} | {mean_tokens:.0f} | {fast_rate[1]:,.0f} | {fast_rate[2]:,.0f} "
                f"| {slow_rate:,.0f} | {max(fast_rate.values()) / slow_rate:.1f}x | {cpu_ratio:.1f}x |"
            )
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
