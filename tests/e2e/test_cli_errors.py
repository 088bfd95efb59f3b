"""Every user mistake named in the reliability contract: one line, the field or file, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest


def write_rows(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def good_row(i=0, content="3+4="):
    return {"data_source": "arithmetic", "prompt": [{"role": "user", "content": content}], "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": "7"}, "extra_info": {"index": i}}


def run(tmp_path, *overrides, timeout=180):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HOME=str(tmp_path))
    env.pop("RLFLOW_DEBUG", None)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "rlflow.main", "+recipe=grpo", "trainer.progress_bar=false",
                           f"trainer.output_dir={tmp_path / 'out'}", *overrides],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("rlflow:")]
    return proc, lines


def tiny_model_without_pad(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlflow.demo.assets import ensure_demo_model

    src = ensure_demo_model()
    tok = AutoTokenizer.from_pretrained(src)
    target = tmp_path / "nopad"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(target)
    tok.save_pretrained(target)
    cfg_path = target / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("pad_token", "eos_token"):
        cfg.pop(key, None)
    cfg_path.write_text(json.dumps(cfg))
    special = target / "special_tokens_map.json"
    if special.exists():
        special.unlink()
    return str(target)


CASES = {
    "corrupt parquet": (lambda t: [f"data.train_files=[{(t / 'bad.parquet').write_bytes(b'not parquet') and t / 'bad.parquet'}]"], "bad.parquet"),
    "missing column": (lambda t: [f"data.train_files=[{write_rows(t / 'nocol.parquet', [{'question': 'x'}] * 40)}]"], "prompt"),
    "bad chat format": (lambda t: [f"data.train_files=[{write_rows(t / 'chat.parquet', [{**good_row(), 'prompt': 'not messages'}] * 40)}]"], "row"),
    "overlong prompt": (lambda t: [f"data.train_files=[{write_rows(t / 'long.parquet', [good_row(content='1+1=' * 10)] * 40)}]",
                                   "data.filter_overlong_prompts=false", "data.truncation=error"], "max_prompt_length"),
    "empty after filtering": (lambda t: [f"data.train_files=[{write_rows(t / 'all_long.parquet', [good_row(content='1+1=' * 10)] * 40)}]"], "dropped"),
    "missing model path": (lambda t: [f"model.path={t / 'no_model'}"], "model.path"),
    "batch sizes": (lambda t: ["data.train_batch_size=30", "actor.ppo_mini_batch_size=8"], "actor.ppo_mini_batch_size"),
    "tokenizer without pad": (lambda t: [f"model.path={tiny_model_without_pad(t)}"], "pad"),
    "more workers than cpus": (lambda t: ["actor.num_workers=4", "actor.cpus_per_worker=1", "actor.ppo_mini_batch_size=32"], "actor.num_workers"),
    "unreachable ray": (lambda t: ["cluster.address=127.0.0.1:1"], "cluster.address"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_error_is_one_line_naming_the_fix(tmp_path, case):
    make_overrides, needle = CASES[case]
    proc, lines = run(tmp_path, *make_overrides(tmp_path))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    # Nothing half-written: no checkpoint appears for a run that never started.
    assert not (tmp_path / "out" / "checkpoints").exists()
