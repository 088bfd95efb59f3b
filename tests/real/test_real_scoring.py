"""The roles agree on the real model before any update (workers run in this process, no Ray).

SmolLM2-135M-Instruct (49,152-token vocabulary, tied embeddings, 9 query / 3 key-value heads)
answers two real GSM8K questions through the HF rollout worker; the actor and the reference
policy then score the sampled tokens.

Tolerances: the rollout computes each token's log-prob from a KV-cached decoding step, the
actor from one full forward pass of the sequence; in float32 these differ by float summation
order only, measured here at ~1e-5 and asserted at ``ROLLOUT_TOL``. Layouts (padded /
unpadded / packed) and the chunked vs direct LM head differ by summation order too (``TOL``).
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

import rlflow
from rlflow.data.rlhf_dataset import RLHFDataset, collate_fn
from rlflow.models.loading import load_tokenizer
from rlflow.models.packing import build_model_inputs, score_responses
from rlflow.workers.policy import PolicyWorker
from rlflow.workers.rollout.hf_rollout import HFRolloutWorker

N_SAMPLES = 2
RESPONSE_LEN = 24
ROLLOUT_TOL = 1e-3
TOL = 1e-4


@pytest.fixture(scope="module")
def config(real_model, gsm8k_dir, shortest_rows) -> dict:
    train = shortest_rows(gsm8k_dir / "train.parquet", "question", 2)
    cfg = rlflow.compose_config("grpo", overrides=[
        f"model.path={real_model}",
        f"data.train_files=[{train}]",
        "data.max_prompt_length=160",
        f"data.max_response_length={RESPONSE_LEN}",
        f"rollout.n={N_SAMPLES}",
        "rollout.temperature=1.0",
        "actor.use_kl_loss=true",
        "actor.optim.lr=1e-6",
    ])
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.fixture(scope="module")
def workers(config):
    return {
        "rollout": HFRolloutWorker(config),
        "actor": PolicyWorker(config, role="actor"),
        "ref": PolicyWorker(config, role="ref"),
    }


@pytest.fixture(scope="module")
def sampled(config, workers):
    cfg = OmegaConf.create(config)
    tokenizer = load_tokenizer(cfg.model)
    dataset = RLHFDataset(list(cfg.data.train_files), tokenizer, max_prompt_length=int(cfg.data.max_prompt_length))
    prompts = collate_fn([dataset[i] for i in range(len(dataset))]).repeat_interleave(N_SAMPLES)
    batch = workers["rollout"].generate(prompts, seed=0)
    assert batch["response_mask"].sum() >= 2 * N_SAMPLES * 8, "the model must answer with real text"
    return batch


def test_actor_and_rollout_log_probs_agree_at_step_one(workers, sampled):
    mask = sampled["response_mask"].bool()
    actor = workers["actor"].compute_log_prob(sampled, micro_batch_size=2)["log_probs"]
    rollout = sampled["rollout_log_probs"]
    gap = (actor - rollout).abs()[mask]
    assert gap.max() <= ROLLOUT_TOL, gap.max()
    # a real distribution: most sampled tokens are likely, some are not
    assert actor[mask].max() <= 0 and actor[mask].min() < -0.5


def test_ratio_one_and_kl_zero_at_step_one(workers, sampled):
    old = workers["actor"].compute_log_prob(sampled, micro_batch_size=4)["log_probs"]
    ref = workers["ref"].compute_log_prob(sampled, micro_batch_size=1)["log_probs"]
    torch.testing.assert_close(ref, old, rtol=0, atol=TOL)
    batch = sampled.select_indices(list(range(sampled.size)))
    batch["old_log_probs"], batch["ref_log_probs"] = old, ref
    # advantages of both signs, so the clipped loss has a gradient
    batch["advantages"] = torch.tensor([1.0, -1.0] * (batch.size // 2))[:, None] * batch["response_mask"]
    metrics = workers["actor"].update_policy(batch, mini_batch_size=batch.size)
    assert abs(metrics["actor/ppo_kl"]) <= 1e-6  # mean of old - new: the ratio is 1
    assert metrics["actor/pg_clipfrac"] == 0.0
    assert abs(metrics["actor/kl"]) <= 1e-6
    assert metrics["actor/grad_norm"] > 0


def test_layouts_and_chunked_head_agree_on_real_model(workers, sampled):
    model = workers["ref"].model
    rows = {k: sampled[k] for k in ("input_ids", "attention_mask", "position_ids", "responses")}
    results = {}
    with torch.no_grad():
        for layout in ("padded", "unpadded", "packed"):
            inputs = build_model_inputs(*rows.values(), layout, mask_kind=workers["ref"].mask_kind)
            for chunked in (True, False):
                results[layout, chunked] = score_responses(model, inputs, 1.0, with_entropy=True, chunked=chunked)
    lp_ref, ent_ref = results["padded", False]
    assert ent_ref[sampled["response_mask"].bool()].min() > 0
    for key, (lp, ent) in results.items():
        torch.testing.assert_close(lp, lp_ref, rtol=0, atol=TOL, msg=f"log-probs {key}")
        torch.testing.assert_close(ent, ent_ref, rtol=0, atol=TOL, msg=f"entropy {key}")


def test_chunked_head_gradients_equal_direct_on_real_model(workers, sampled):
    model = workers["actor"].model
    inputs = build_model_inputs(
        sampled["input_ids"], sampled["attention_mask"], sampled["position_ids"], sampled["responses"],
        "packed", mask_kind=workers["actor"].mask_kind,
    )
    watched = {n: p for n, p in model.named_parameters() if n in ("model.embed_tokens.weight", "model.layers.29.mlp.down_proj.weight", "model.norm.weight")}
    grads = {}
    for chunked in (False, True):
        model.zero_grad(set_to_none=True)
        lp, ent = score_responses(model, inputs, 1.0, with_entropy=True, chunked=chunked)
        (lp.sum() + 0.01 * ent.sum()).backward()
        grads[chunked] = {n: p.grad.clone() for n, p in watched.items()}
    model.zero_grad(set_to_none=True)
    assert len(watched) == 3
    for name, direct in grads[False].items():
        assert direct.abs().max() > 0, name
        rel = (grads[True][name] - direct).abs().max() / direct.abs().max()
        assert rel <= 1e-4, (name, rel)
