"""The DPO policy worker: sequence log-probs of preference pairs and the DPO update, against a
naive per-row computation, in process (one rank)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

import rlflow
from rlflow.data.preference_dataset import PreferenceDataset, collate_preference
from rlflow.models.loading import load_tokenizer, resolve_model_path
from rlflow.workers.dpo_policy import DPOPolicyWorker


def dpo_config(**overrides) -> dict:
    items = [f"{k}={v}" for k, v in overrides.items()]
    cfg = rlflow.compose_config("dpo", overrides=["actor.num_workers=1", *items])
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.fixture(scope="module")
def batch():
    cfg = OmegaConf.create(dpo_config())
    dataset = PreferenceDataset(
        ["demo:arithmetic_preference/test.parquet"], load_tokenizer(cfg.model),
        max_length=20, max_prompt_length=16,
    )
    return collate_preference([dataset[i] for i in range(6)], dataset.pad_token_id)


def naive_logps(model, batch) -> torch.Tensor:
    """Sum over answer tokens of log p(token | prefix), one unpadded row at a time."""
    out = []
    with torch.no_grad():
        for i in range(batch.size):
            n = int(batch["input_lengths"][i])
            ids = batch["input_ids"][i, :n]
            logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].float(), -1)
            start = int(batch["prompt_lengths"][i])
            out.append(sum(logp[t - 1, ids[t]].item() for t in range(start, n)))
    return torch.tensor(out)


def test_sequence_log_probs_match_a_naive_loop(batch):
    worker = DPOPolicyWorker(dpo_config(), role="ref")
    got = worker.compute_sequence_log_probs(batch, micro_batch_size=4)
    lm = AutoModelForCausalLM.from_pretrained(resolve_model_path(worker.cfg.model.path))
    assert torch.allclose(got["logps"], naive_logps(lm, batch), atol=1e-4)
    answer_tokens = batch["input_lengths"] - batch["prompt_lengths"]
    assert torch.equal(got["num_tokens"].long(), answer_tokens)


def _with_ref(batch, offsets: torch.Tensor) -> dict:
    worker = DPOPolicyWorker(dpo_config(), role="ref")
    data = type(batch)(dict(batch))
    data["ref_logps"] = worker.compute_sequence_log_probs(batch, micro_batch_size=12)["logps"] + offsets
    return data


def test_update_reports_dpo_and_sft_losses_of_the_whole_batch(batch):
    offsets = torch.tensor([0.5, -0.3, 0.2, 0.4, -1.0, 0.1, 0.0, 0.3, 0.2, -0.2, 0.7, 0.0])
    data = _with_ref(batch, offsets)
    cfg = dpo_config(**{"dpo.beta": 0.5, "dpo.sft_loss_coef": 0.3, "dpo.label_smoothing": 0.1})
    worker = DPOPolicyWorker(cfg, role="actor", total_steps=1)
    metrics = worker.update_dpo(data, micro_batch_size=4)

    # Before the step the policy equals the reference model minus the offsets.
    policy = (data["ref_logps"] - offsets).view(-1, 2)
    ref = data["ref_logps"].view(-1, 2)
    h = (policy[:, 0] - policy[:, 1]) - (ref[:, 0] - ref[:, 1])
    expected = (-(0.9) * F.logsigmoid(0.5 * h) - 0.1 * F.logsigmoid(-0.5 * h)).mean()
    assert metrics["dpo/loss"] == pytest.approx(expected.item(), rel=1e-4)
    chosen_r, rejected_r = 0.5 * (policy[:, 0] - ref[:, 0]), 0.5 * (policy[:, 1] - ref[:, 1])
    assert metrics["dpo/accuracy"] == pytest.approx((chosen_r > rejected_r).float().mean().item())
    assert metrics["dpo/margin"] == pytest.approx((chosen_r - rejected_r).mean().item(), abs=1e-5)
    assert metrics["dpo/chosen_rewards"] == pytest.approx(chosen_r.mean().item(), abs=1e-5)
    chosen_tokens = (batch["input_lengths"] - batch["prompt_lengths"])[0::2].sum()
    assert metrics["dpo/sft_loss"] == pytest.approx((-policy[:, 0].sum() / chosen_tokens).item(), rel=1e-4)


def test_gradient_does_not_depend_on_micro_batch_size(batch):
    data = _with_ref(batch, torch.linspace(-0.5, 0.5, 12))
    norms = []
    for micro in (2, 4, 5, 12):  # 5 rounds down to 4 (pairs stay whole); 4 leaves a last slice of 4
        worker = DPOPolicyWorker(dpo_config(**{"dpo.sft_loss_coef": 0.2}), role="actor", total_steps=1)
        metrics = worker.update_dpo(data, micro_batch_size=micro)
        norms.append((metrics["dpo/loss"], metrics["actor/grad_norm"]))
    for loss, norm in norms[1:]:
        assert loss == pytest.approx(norms[0][0], rel=1e-5)
        assert norm == pytest.approx(norms[0][1], rel=1e-4)


def test_steps_raise_the_chosen_margin(batch):
    torch.manual_seed(0)
    data = _with_ref(batch, torch.zeros(12))
    worker = DPOPolicyWorker(dpo_config(**{"actor.optim.lr": 1e-2}), role="actor", total_steps=20)
    first = worker.update_dpo(data, micro_batch_size=12)
    for _ in range(15):
        last = worker.update_dpo(data, micro_batch_size=12)
    assert first["dpo/margin"] == pytest.approx(0.0, abs=1e-6)
    assert last["dpo/margin"] > 0.5 and last["dpo/accuracy"] == 1.0
    assert last["dpo/loss"] < first["dpo/loss"]


def test_odd_row_count_is_rejected(batch):
    worker = DPOPolicyWorker(dpo_config(), role="actor", total_steps=1)
    data = type(batch)(dict(batch))
    data["ref_logps"] = torch.zeros(batch.size)
    odd = type(batch)(data.slice(0, 5).data)
    with pytest.raises(ValueError, match="even"):
        worker.update_dpo(odd, micro_batch_size=4)
