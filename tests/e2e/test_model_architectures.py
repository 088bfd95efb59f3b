"""GRPO with two FSDP2 actor ranks on tiny random-init models of six transformers
architectures, each exported as a Hugging Face folder and loaded back; and the CLI's one-line
errors for architecture settings that cannot work. One local Ray cluster serves every run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import rlflow
from tiny_models import TINY_ARCHITECTURES, build_tiny_model
from rlflow.export import export_hf_model
from rlflow.distributed.state_transport import get_state

pytestmark = pytest.mark.ray

# Mistral and Gemma2 (sliding window 8 < prompt + response) train with packed rows, Qwen2 with
# dynamic batching, the others with padded micro-batches.
OVERRIDES = {
    # validation on: trainer.val_before_train (default true) logs a step-0 row first
    "llama": ["trainer.test_freq=2"],
    "mistral": ["actor.use_sequence_packing=true", "actor.max_tokens_per_microbatch=64"],
    "gemma2": ["actor.use_sequence_packing=true", "actor.max_tokens_per_microbatch=64"],
    "qwen2": ["actor.use_dynamic_bsz=true", "actor.max_tokens_per_microbatch=64"],
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = str(tmp_path_factory.mktemp("archs"))
    return {arch: build_tiny_model(root, arch) for arch in TINY_ARCHITECTURES}


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_grpo_steps_with_two_actor_ranks_then_export(ray_cluster, models, tmp_path, arch):
    out = tmp_path / "run"
    cfg = rlflow.compose_config("grpo", overrides=[
        f"model.path={models[arch]}", f"trainer.output_dir={out}", "trainer.total_steps=2",
        "trainer.save_freq=2", "trainer.progress_bar=false", "data.train_batch_size=4", "data.max_samples=16",
        "actor.num_workers=2", "actor.torch_threads=1",
        "rollout.n=2", "actor.ppo_mini_batch_size=2", "actor.ppo_micro_batch_size_per_worker=2",
        "actor.log_prob_micro_batch_size_per_worker=4", "actor.use_kl_loss=false", "actor.optim.lr=1e-2",
        *OVERRIDES.get(arch, []),
    ])
    trainer = rlflow.build_trainer(cfg)
    try:
        assert len(trainer.groups["actor"].workers_info()) == 2
        history = trainer.fit()
        published = [r for r in trainer.groups["actor"].call_all("publish_weights") if r is not None]
        live = get_state(published[0][0])
    finally:
        trainer.close()
    if arch == "llama":
        first = history.pop(0)
        assert first["step"] == 0 and 0.0 <= first["val/reward/mean"] <= 1.0
        assert "reward/mean" not in first  # validation only, no training step
        assert "val/reward/mean" in history[-1]
    assert [row["step"] for row in history] == [1, 2]
    for row in history:
        for key in ("actor/pg_loss", "actor/entropy", "actor/grad_norm"):
            assert row[key] == row[key] and abs(row[key]) != float("inf"), (key, row[key])
        assert row["actor/entropy"] > 0
        assert row["actor/num_updates"] == 2  # 4 prompts in mini-batches of 2

    target = tmp_path / "hf"
    export_hf_model(str(out / "checkpoints" / "global_step_2"), str(target))
    exported = AutoModelForCausalLM.from_pretrained(target).eval()
    base = AutoModelForCausalLM.from_pretrained(models[arch]).eval()
    assert type(exported) is type(base)
    state, base_state = exported.state_dict(), base.state_dict()
    assert set(live) <= set(state)
    for name, tensor in live.items():
        assert torch.equal(state[name], tensor), name
    moved = [name for name in live if not torch.equal(base_state[name], state[name])]
    assert moved, "two GRPO steps at lr 1e-2 must change the weights"
    # the exported folder scores text like the live policy loaded into the base model
    base.load_state_dict(live, strict=False)
    ids = torch.tensor([[3, 8, 9, 10, 11, 7, 12]])
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, base(ids).logits)


def run_cli(tmp_path, *overrides):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HOME=str(tmp_path))
    env.pop("RLFLOW_DEBUG", None)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "rlflow.main", "+recipe=grpo", "trainer.progress_bar=false",
         f"trainer.output_dir={tmp_path / 'out'}", *overrides],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
    )
    return proc, [line for line in proc.stderr.splitlines() if line.startswith("rlflow:")]


@pytest.mark.parametrize(
    "arch,overrides,needle",
    [
        ("gemma2", ["model.attn_implementation=sdpa"], "model.attn_implementation=eager"),
        ("mistral", ["model.attn_implementation=flex_attention", "actor.use_sequence_packing=true"],
         "actor.use_sequence_packing=false"),
    ],
)
def test_cli_refuses_unsupported_architecture_settings_in_one_line(models, tmp_path, arch, overrides, needle):
    proc, lines = run_cli(tmp_path, f"model.path={models[arch]}", *overrides)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout  # refused before Ray
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
