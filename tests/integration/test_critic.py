"""The critic worker: values from a value head on the LM backbone, clipped value updates with
global normalisation, in process (1 rank) and through Ray with FSDP2 (2 ranks)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

import rlflow
from rlflow.data.batched_data_dict import BatchedDataDict
from rlflow.distributed.resource_pool import ResourcePool
from rlflow.distributed.worker_group import WorkerGroup
from rlflow.models.loading import resolve_model_path
from rlflow.utils.torch_functional import compute_position_ids
from rlflow.workers.critic import CriticWorker

PROMPT_LEN = 5
RESPONSE_LEN = 4
PAD = 0


def critic_config(**overrides) -> dict:
    items = [f"{k}={v}" for k, v in overrides.items()]
    cfg = rlflow.compose_config("ppo", overrides=["critic.optim.lr=1e-2", *items])
    return OmegaConf.to_container(cfg, resolve=True)


def make_batch(size: int, seed: int) -> BatchedDataDict:
    """Left-padded random prompts + right-padded random responses, like a rollout's output."""
    gen = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(2, PROMPT_LEN + 1, (size,), generator=gen)
    response_lens = torch.randint(1, RESPONSE_LEN + 1, (size,), generator=gen)
    prompts = torch.randint(6, 20, (size, PROMPT_LEN), generator=gen)
    responses = torch.randint(6, 20, (size, RESPONSE_LEN), generator=gen)
    prompt_mask = (torch.arange(PROMPT_LEN) >= PROMPT_LEN - prompt_lens[:, None]).long()
    response_mask = (torch.arange(RESPONSE_LEN) < response_lens[:, None]).long()
    prompts = torch.where(prompt_mask.bool(), prompts, PAD)
    responses = torch.where(response_mask.bool(), responses, PAD)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    return BatchedDataDict(
        {
            "input_ids": torch.cat([prompts, responses], dim=1),
            "attention_mask": attention_mask,
            "position_ids": compute_position_ids(attention_mask),
            "responses": responses,
            "response_mask": response_mask,
        }
    )


def randomise_head(critic: CriticWorker, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head = critic.model.value_head
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.5)
        head.bias.fill_(0.1)


@pytest.fixture(scope="module")
def config() -> dict:
    return critic_config()


def test_backbone_comes_from_model_path_and_head_starts_at_zero(config):
    critic = CriticWorker(config)
    lm = AutoModelForCausalLM.from_pretrained(resolve_model_path(config["model"]["path"]))
    backbone = critic.model.backbone.state_dict()
    reference = lm.model.state_dict()
    assert backbone.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(backbone[key], value), key
    values = critic.compute_values(make_batch(6, seed=0))["values"]
    assert values.shape == (6, RESPONSE_LEN)
    assert torch.count_nonzero(values) == 0


def test_values_are_the_head_on_the_hidden_state_before_each_token(config):
    critic = CriticWorker(config)
    randomise_head(critic, seed=1)
    batch = make_batch(8, seed=2)
    values = critic.compute_values(batch, micro_batch_size=3)["values"]

    lm = AutoModelForCausalLM.from_pretrained(resolve_model_path(config["model"]["path"]))
    w, b = critic.model.value_head.weight[0].detach(), critic.model.value_head.bias[0].detach()
    with torch.no_grad():
        for i in range(batch.size):
            # Run the row on its own, without padding: position p's hidden state has read
            # tokens 0..p, so the state before response token t is at p = last prompt token + t.
            keep = batch["attention_mask"][i].bool()
            ids = batch["input_ids"][i][keep].unsqueeze(0)
            hidden = lm.model(input_ids=ids).last_hidden_state[0]
            n_prompt = int(keep[:PROMPT_LEN].sum())
            for t in range(RESPONSE_LEN):
                if batch["response_mask"][i, t]:
                    expected = float(hidden[n_prompt - 1 + t] @ w + b)
                    assert values[i, t].item() == pytest.approx(expected, abs=1e-4), (i, t)
                else:
                    assert values[i, t].item() == 0.0


def test_values_depend_only_on_the_prefix(config):
    critic = CriticWorker(config)
    randomise_head(critic, seed=3)
    batch = make_batch(4, seed=4)
    batch["response_mask"][:] = 1  # every response full length, so every position has a value
    batch["attention_mask"][:, PROMPT_LEN:] = 1
    batch["position_ids"] = compute_position_ids(batch["attention_mask"])
    before = critic.compute_values(batch)["values"]
    changed = BatchedDataDict({k: v.clone() for k, v in batch.items()})
    changed["responses"][:, 1] = 5
    changed["input_ids"][:, PROMPT_LEN + 1] = 5
    after = critic.compute_values(changed)["values"]
    # Token 1 is read only by the states before tokens 2 and 3.
    assert torch.allclose(before[:, :2], after[:, :2], atol=1e-6)
    assert not torch.allclose(before[:, 2:], after[:, 2:], atol=1e-4)


def _with_targets(batch: BatchedDataDict, values: torch.Tensor, seed: int) -> BatchedDataDict:
    gen = torch.Generator().manual_seed(seed)
    out = BatchedDataDict(dict(batch))
    out["values"] = values
    out["returns"] = torch.rand(values.shape, generator=gen) * batch["response_mask"]
    return out


def test_update_reports_the_clipped_value_loss_of_the_whole_batch():
    cfg = critic_config(**{"critic.cliprange_value": 0.2, "critic.ppo_micro_batch_size_per_worker": 4})
    critic = CriticWorker(cfg)
    randomise_head(critic, seed=5)
    batch = make_batch(6, seed=6)
    values = critic.compute_values(batch)["values"]
    # Old values 0.3 away from the current ones with cliprange 0.2: the clipped term is
    # computed from old +- 0.2.
    old = values + 0.3 * batch["response_mask"]
    data = _with_targets(batch, old, seed=7)
    metrics = critic.update_critic(data, mini_batch_size=6)

    mask = batch["response_mask"].bool()
    v, o, r = values[mask], old[mask], data["returns"][mask]
    clipped = o + torch.clamp(v - o, -0.2, 0.2)
    expected = 0.5 * torch.maximum((v - r) ** 2, (clipped - r) ** 2).mean()
    assert metrics["critic/vf_loss"] == pytest.approx(expected.item(), rel=1e-5)
    frac = ((clipped - r) ** 2 > (v - r) ** 2).float().mean()
    assert metrics["critic/vf_clipfrac"] == pytest.approx(frac.item(), abs=1e-6)
    assert metrics["critic/vpred_mean"] == pytest.approx(v.mean().item(), abs=1e-5)
    assert metrics["critic/num_updates"] == 1.0


def test_gradient_does_not_depend_on_micro_batch_size():
    batch = make_batch(6, seed=8)
    results = []
    for micro in (4, 6, 1):  # 4 leaves a short last micro-batch of 2
        critic = CriticWorker(critic_config(**{"critic.ppo_micro_batch_size_per_worker": micro}))
        randomise_head(critic, seed=9)
        data = _with_targets(batch, critic.compute_values(batch)["values"], seed=10)
        results.append(critic.update_critic(data, mini_batch_size=6))
    for other in results[1:]:
        assert other["critic/vf_loss"] == pytest.approx(results[0]["critic/vf_loss"], rel=1e-5)
        assert other["critic/grad_norm"] == pytest.approx(results[0]["critic/grad_norm"], rel=1e-4)


def test_repeated_updates_regress_values_onto_returns():
    torch.manual_seed(0)
    critic = CriticWorker(critic_config(**{"critic.cliprange_value": 10.0}))
    batch = make_batch(8, seed=11)
    targets = _with_targets(batch, torch.zeros(8, RESPONSE_LEN), seed=12)["returns"]
    mask = batch["response_mask"].bool()
    first = None
    for _ in range(60):
        values = critic.compute_values(batch)["values"]
        data = BatchedDataDict(dict(batch))
        data["values"], data["returns"] = values, targets
        loss = critic.update_critic(data, mini_batch_size=8)["critic/vf_loss"]
        first = loss if first is None else first
    final = critic.compute_values(batch)["values"]
    assert 0.5 * ((final[mask] - targets[mask]) ** 2).mean().item() < 0.1 * first


@pytest.mark.ray
def test_two_fsdp_ranks_match_one_process(ray_cluster):
    batch = make_batch(8, seed=13)
    cfg_one = critic_config(**{"critic.ppo_micro_batch_size_per_worker": 8})
    single = CriticWorker(cfg_one)
    data = _with_targets(batch, single.compute_values(batch)["values"], seed=14)
    single_metrics = [single.update_critic(data, mini_batch_size=8)]
    single_values = single.compute_values(batch)["values"]
    data2 = _with_targets(batch, single_values, seed=15)
    single_metrics.append(single.update_critic(data2, mini_batch_size=8))

    cfg_two = critic_config(**{"critic.num_workers": 2, "critic.ppo_micro_batch_size_per_worker": 2})
    pool = ResourcePool("critic-test", num_workers=2, cpus_per_worker=0.5)
    group = WorkerGroup(CriticWorker, "critic-test", pool, init_kwargs={"config": cfg_two})
    try:
        assert len({info["pid"] for info in group.workers_info()}) == 2
        zeros = group.call_sharded("compute_values", batch)["values"]
        assert torch.count_nonzero(zeros) == 0
        # Each rank updates on its half; the gradient is that of the whole batch.
        sharded_metrics = [group.call_sharded_metrics("update_critic", data, mini_batch_size=4)]
        values = group.call_sharded("compute_values", batch)["values"]
        sharded_metrics.append(group.call_sharded_metrics("update_critic", data2, mini_batch_size=4))
    finally:
        group.shutdown()

    assert torch.allclose(values, single_values, atol=1e-5)
    for one, two in zip(single_metrics, sharded_metrics):
        assert two[0] == two[1], "metrics are reduced over ranks, so every rank reports the same"
        for key in ("critic/vf_loss", "critic/vpred_mean", "critic/vf_clipfrac"):
            assert two[0][key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key
        assert two[0]["critic/grad_norm"] == pytest.approx(one["critic/grad_norm"], rel=1e-4)


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"critic.ppo_mini_batch_size": 100}, "critic.ppo_mini_batch_size"),
        ({"critic.num_workers": 3}, "critic.num_workers"),
        ({"critic.cliprange_value": -1}, "critic.cliprange_value"),
        ({"critic.loss_agg_mode": "sum"}, "critic.loss_agg_mode"),
        ({"algorithm.adv_estimator": "grpo", "rollout.n": 4, "trainer.critic_warmup": 3}, "trainer.critic_warmup"),
    ],
)
def test_bad_critic_settings_name_the_key(overrides, key):
    from rlflow.errors import ConfigError
    from rlflow.trainer.config_checks import check_config

    items = [f"{k}={v}" for k, v in overrides.items()]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_config(rlflow.compose_config("ppo", overrides=items))


@pytest.mark.ray
def test_ppo_trainer_trains_only_the_critic_during_warmup(ray_cluster, tmp_path):
    cfg = rlflow.compose_config(
        "ppo",
        overrides=[
            f"trainer.output_dir={tmp_path}", "trainer.progress_bar=false", "trainer.total_steps=3",
            "trainer.critic_warmup=2", "data.train_batch_size=32", "actor.ppo_mini_batch_size=16",
            "critic.ppo_mini_batch_size=32",
        ],
    )
    trainer = rlflow.build_trainer(cfg)
    try:
        # the actor's one worker samples and holds the frozen reference (ref.in_actor)
        assert set(trainer.groups) == {"actor", "critic"}
        history = [trainer.step() for _ in range(3)]
    finally:
        trainer.close()
    for row in history[:2]:
        assert "actor/pg_loss" not in row and row["weight_version"] == 0
        assert row["critic/num_updates"] == 1.0
    assert history[2]["actor/num_updates"] == 2.0 and history[2]["weight_version"] == 1
    # Zero head: step 1 sees values of exactly 0; the critic has moved by step 2.
    assert history[0]["values/mean"] == 0.0
    assert history[1]["values/mean"] != 0.0
    # KL in the reward needs the sampling policy's log-probs: on every step.
    assert all("timing/old_log_prob_s" in row and "actor/reward_kl_penalty" in row for row in history)
