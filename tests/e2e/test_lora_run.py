"""LoRA runs through Ray: no reference workers, adapter-only syncs, exact resume, export."""

from __future__ import annotations

import json

import pytest
import torch

import rlflow
from rlflow.distributed.state_transport import get_state
from rlflow.models.loading import resolve_model_path
from rlflow.models.lora import is_adapter_key

pytestmark = pytest.mark.ray

COMPARED = ("reward/mean", "actor/pg_loss", "actor/kl", "actor/entropy", "actor/grad_norm", "response_length/mean")


def build(recipe: str, out, *overrides: str):
    cfg = rlflow.compose_config(recipe, [f"trainer.output_dir={out}", "trainer.progress_bar=false", *overrides])
    return rlflow.build_trainer(cfg)


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_lora_grpo_syncs_adapters_resumes_exactly_and_exports(ray_cluster, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlflow.export import main as export_main

    run_a = tmp_path / "a"
    trainer = build("grpo_lora", run_a, "trainer.total_steps=4", "trainer.save_freq=2", "trainer.export_hf=true")
    try:
        assert {role: wg.world_size for role, wg in trainer.groups.items()} == {"actor": 2, "rollout": 1}
        trainer.fit()
        actor, rollout = trainer.groups["actor"], trainer.groups["rollout"]
        # A sync ships the adapters only.
        shipped = get_state([r for r in actor.call_all("publish_weights") if r is not None][0][0])
        assert shipped and all(is_adapter_key(k) for k in shipped)
        # After the syncs the rollout worker holds the actor's policy.
        prompts = trainer._collate([trainer.train_dataset[i] for i in range(8)])
        batch = rollout.call_sharded("generate", prompts, seed=5, expected_weight_version=trainer.weight_version)
        mask = batch["response_mask"].bool()
        actor_lp = actor.call_sharded("compute_log_prob", batch, micro_batch_size=4)["log_probs"]
        engine_lp = rollout.call_sharded("engine_log_probs", batch)["log_probs"]
        assert (actor_lp - engine_lp)[mask].abs().max() < 1e-5
        ref_lp = actor.call_sharded("compute_log_prob", batch, micro_batch_size=4, reference=True)["log_probs"]
        assert (actor_lp - ref_lp)[mask].abs().max() > 1e-3, "the adapters did not train"
        model_path = resolve_model_path(trainer.cfg.model.path)
    finally:
        trainer.close()
    expected = {r["step"]: r for r in rows(run_a)}

    # Resume from step 2's checkpoint (adapters + optimiser) in a fresh run: steps 3-4 repeat exactly.
    ckpt = run_a / "checkpoints" / "global_step_2"
    run_b = tmp_path / "b"
    trainer = build("grpo_lora", run_b, "trainer.total_steps=4", f"trainer.resume_mode={ckpt}")
    try:
        trainer.fit()
    finally:
        trainer.close()
    resumed = {r["step"]: r for r in rows(run_b)}
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        for key in COMPARED:
            assert resumed[step][key] == expected[step][key], (step, key)

    # Export: the adapter folder loads with peft; the merged model gives the same policy.
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    assert export_main([str(run_a / "checkpoints" / "global_step_4"), str(adapter), "--merged", str(merged)]) == 0
    ids = batch["input_ids"]
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path), adapter).eval()(ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
        auto_logits = AutoModelForCausalLM.from_pretrained(run_a / "hf_model").eval()(ids).logits
        base_logits = AutoModelForCausalLM.from_pretrained(model_path).eval()(ids).logits
    assert (peft_logits - merged_logits).abs().max() < 1e-4
    assert (auto_logits - merged_logits).abs().max() < 1e-4, "the end-of-run export is the final policy"
    assert (peft_logits - base_logits).abs().max() > 1e-3
    assert (run_a / "lora_adapter" / "adapter_config.json").is_file()


def test_lora_dpo_and_ppo_run_without_reference_workers(ray_cluster, tmp_path):
    trainer = build("dpo", tmp_path / "dpo", "trainer.total_steps=2", "actor.lora.rank=8", "actor.optim.lr=1e-2")
    try:
        assert set(trainer.groups) == {"actor"}
        history = trainer.fit()
    finally:
        trainer.close()
    assert history[0]["step"] == 0 and history[0]["val/dpo/accuracy"] == 0.0, "policy == reference at the start"
    assert history[-1]["step"] == 2 and history[-1]["val/dpo/margin"] != 0.0

    # PPO: the critic is a model of its own (its own backbone copy), so LoRA on the actor
    # leaves it as it is; the KL in the reward is measured against the actor's base.
    trainer = build("ppo", tmp_path / "ppo", "trainer.total_steps=2", "actor.lora.rank=8")
    try:
        assert set(trainer.groups) == {"actor", "critic", "rollout"}
        history = trainer.fit()
    finally:
        trainer.close()
    # B starts at zero, so the first step's policy is exactly the base; after an update it is not
    assert history[0]["actor/reward_kl_penalty"] == 0.0
    assert history[-1]["actor/reward_kl_penalty"] != 0.0
