"""GRPO and DPO on the real model through Ray actor groups (one Ray cluster for the module).

Sizes are the smallest that still mean something on SmolLM2-135M-Instruct: 2 real prompts x
2 samples x 16 response tokens per GRPO step; DPO on the 8 shortest real preference pairs
(two epochs), judged on 8 held-out pairs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import rlflow
from rlflow.export import export_hf_model

pytestmark = pytest.mark.ray

ROLLOUT_TOL = 1e-3  # see test_real_scoring.py: KV-cached decoding vs one full forward pass


# A 135M model rarely solves a real problem in 16 tokens, so the task's own reward is almost
# always 0 for both samples of a prompt and GRPO's advantages vanish. A small second component
# (the share of distinct words in the answer) differs between two sampled answers, so the
# policy-gradient term itself carries a gradient, with no entropy bonus to lean on.
VARIETY_REWARD = """
def variety(data_source, solution_str, ground_truth, extra_info=None):
    words = solution_str.split()
    return len(set(words)) / max(1, len(words)) + len(solution_str) / 1000
"""


def grpo_overrides(model: str, train: str, out: Path, *extra: str) -> list[str]:
    variety = out.parent / "variety_reward.py"
    variety.write_text(VARIETY_REWARD)
    return [
        f"model.path={model}",
        f"data.train_files=[{train}]",
        "data.train_batch_size=2",
        "data.max_prompt_length=192",
        "data.max_response_length=16",
        "rollout.n=2",
        "actor.ppo_mini_batch_size=2",
        "actor.recompute_old_log_prob=always",  # old log-probs from a real forward pass
        "actor.use_kl_loss=true",
        f"reward.fns=[{{path:null,name:null,weight:1.0,label:task}},{{path:{variety},name:variety,weight:0.1,label:variety}}]",
        "actor.entropy_coeff=0.0",
        "actor.optim.lr=1e-5",
        f"trainer.output_dir={out}",
        "trainer.total_steps=1",
        "trainer.progress_bar=false",
        *extra,
    ]


def check_step_one(metrics: dict) -> None:
    assert metrics["rollout/logprob_diff_max"] <= ROLLOUT_TOL, metrics["rollout/logprob_diff_max"]
    assert abs(metrics["actor/ppo_kl"]) <= 1e-6  # the PPO ratio is 1 before the update
    assert metrics["actor/pg_clipfrac"] == 0.0
    assert abs(metrics["actor/kl"]) <= 1e-6  # actor == reference before the update
    # No entropy bonus and a zero KL gradient at step one: the gradient is the policy gradient.
    assert metrics["actor/grad_norm"] > 0 and metrics["actor/skipped_updates"] == 0
    assert metrics["reward/std"] > 0, "the samples' rewards differ, so advantages are not all 0"
    assert 0.0 <= metrics["reward/task"] <= 1.0
    assert metrics["actor/entropy"] > 0


def test_grpo_gsm8k_dynamic_batching_fsdp_then_export(ray_cluster, real_model, gsm8k_dir, shortest_rows, tmp_path):
    train = shortest_rows(gsm8k_dir / "train.parquet", "question", 2)
    out = tmp_path / "run"
    cfg = rlflow.compose_config("grpo", overrides=grpo_overrides(
        real_model, train, out,
        "actor.num_workers=2", "actor.torch_threads=1",  # FSDP2 over gloo: the chunked LM head under sharding
        "actor.use_dynamic_bsz=true", "actor.max_tokens_per_microbatch=256",
        # the reference in workers of its own here; the MATH test keeps it in the actor's
        "ref.in_actor=false", "reward.num_workers=1", "ref.use_dynamic_bsz=true", "ref.max_tokens_per_microbatch=256",
        "trainer.save_freq=1",
    ))
    trainer = rlflow.build_trainer(cfg)
    try:
        assert set(trainer.groups) == {"actor", "ref", "rollout", "reward"}  # both with workers of their own
        metrics = trainer.step()
    finally:
        trainer.close()
    check_step_one(metrics)

    checkpoint = out / "checkpoints" / "global_step_1"
    target = export_hf_model(str(checkpoint), str(tmp_path / "exported"))
    exported = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    saved = load_file(str(checkpoint / "actor" / "model.safetensors"))
    state = exported.state_dict()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()
    base = AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.float32).state_dict()
    assert any(not torch.equal(base[n], t) for n, t in saved.items()), "one step must change the weights"


def test_grpo_math_sequence_packing(ray_cluster, real_model, math_dir, shortest_rows, tmp_path):
    train = shortest_rows(math_dir / "train.parquet", "problem", 2)
    cfg = rlflow.compose_config("grpo", overrides=grpo_overrides(
        real_model, train, tmp_path / "run",
        "actor.num_workers=1",
        "actor.use_sequence_packing=true", "actor.max_tokens_per_microbatch=512",
        "ref.use_sequence_packing=true", "ref.max_tokens_per_microbatch=512",
    ))
    trainer = rlflow.build_trainer(cfg)
    try:
        metrics = trainer.step()
    finally:
        trainer.close()
    check_step_one(metrics)  # packed actor and ref log-probs equal the rollout's


def test_dpo_real_pairs_held_out_accuracy_rises(ray_cluster, real_model, preference_dir, tmp_path):
    def shortest(split: str, count: int) -> str:
        frame = pd.read_parquet(preference_dir / f"{split}.parquet")
        size = frame.apply(lambda r: len(r.chosen) + len(r.rejected) + sum(len(m["content"]) for m in r.prompt), axis=1)
        path = tmp_path / f"{split}.parquet"
        frame.loc[size.sort_values(kind="stable").index[:count]].to_parquet(path)
        return str(path)

    out = tmp_path / "dpo"
    cfg = rlflow.compose_config("dpo", overrides=[
        f"model.path={real_model}",
        f"data.train_files=[{shortest('train', 8)}]",
        f"data.val_files=[{shortest('test', 8)}]",
        "data.train_batch_size=4",
        "data.max_prompt_length=96",
        "data.max_response_length=64",
        "actor.num_workers=1",
        "actor.ppo_micro_batch_size_per_worker=8",
        "actor.optim.lr=1e-5",
        "dpo.sft_loss_coef=0.0",
        f"trainer.output_dir={out}",
        "trainer.total_steps=4",
        "trainer.test_freq=4",
        "trainer.progress_bar=false",
    ])
    trainer = rlflow.build_trainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer.close()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    before, after = rows[0], rows[-1]
    assert before["step"] == 0 and after["step"] == 4
    assert after["val/dpo/accuracy"] > before["val/dpo/accuracy"]
    assert after["val/dpo/margin"] > 0
