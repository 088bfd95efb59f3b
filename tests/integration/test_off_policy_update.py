"""The actor applies ``actor.off_policy`` in its real update path (one rank, tiny Llama, no Ray).

Each check compares the accumulated gradient of a corrected run with an uncorrected run whose
outcome is known: ``none`` ignores ``rollout_log_probs``; a correction that keeps every token
at weight 1 changes nothing; a uniform weight scales the policy gradient; rejected tokens
behave exactly as tokens that were never in the response mask (policy loss, entropy, KL and
the token counts); a batch with every token rejected gives no gradient at all.
"""

from __future__ import annotations

import math

import pytest
import torch

from test_gradient_invariance import make_batch, make_config, make_model_dir


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    from rlflow.workers.policy import PolicyWorker

    return PolicyWorker(make_config(make_model_dir(str(tmp_path_factory.mktemp("offpolicy")))), role="actor")


def grads(worker, batch, correction: str = "none", **settings) -> dict[str, torch.Tensor]:
    opc = worker.cfg.actor.off_policy
    opc.correction = correction
    opc.is_cap, opc.mis_low, opc.mis_high = settings.get("is_cap", 2.0), 0.5, 2.0
    try:
        return worker.accumulate_gradients(batch)
    finally:
        opc.correction = "none"


def with_rollout(log_ratio: torch.Tensor):
    """The test batch with ``rollout_log_probs = old_log_probs - log_ratio``."""
    batch = make_batch()
    batch["rollout_log_probs"] = batch["old_log_probs"] - log_ratio
    return batch


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], scale: float = 1.0) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], scale * b[name], rtol=1e-5, atol=1e-8, msg=name)


def test_none_ignores_rollout_log_probs(worker):
    plain = grads(worker, make_batch())
    garbage = with_rollout(torch.full((8, 12), 5.0))
    corrected = grads(worker, garbage)
    assert all(torch.equal(corrected[k], plain[k]) for k in plain)


@pytest.mark.parametrize("correction", ["tis", "mis_token", "mis_seq", "decoupled"])
def test_an_on_policy_batch_is_left_bit_identical(worker, correction):
    plain = grads(worker, make_batch())
    corrected = grads(worker, with_rollout(torch.zeros(8, 12)), correction)
    assert all(torch.equal(corrected[k], plain[k]) for k in plain)


@pytest.mark.parametrize("correction", ["tis", "decoupled"])
def test_a_uniform_weight_scales_the_policy_gradient(worker, correction):
    actor = worker.cfg.actor
    saved = actor.entropy_coeff, actor.use_kl_loss
    actor.entropy_coeff, actor.use_kl_loss = 0.0, False   # only the policy loss is weighted
    try:
        plain = grads(worker, make_batch())
        corrected = grads(worker, with_rollout(torch.full((8, 12), math.log(1.5))), correction)
    finally:
        actor.entropy_coeff, actor.use_kl_loss = saved
    assert_same(corrected, plain, scale=1.5)


def test_rejected_tokens_act_as_if_never_sampled(worker):
    # r = e^3 on a few tokens (outside [0.5, 2]), exactly 1 elsewhere
    log_ratio = torch.zeros(8, 12)
    rejected = [(0, 2), (0, 5), (3, 0), (4, 1), (6, 4)]
    for row, col in rejected:
        log_ratio[row, col] = 3.0
    corrected = grads(worker, with_rollout(log_ratio), "mis_token")
    shrunk = make_batch()
    for row, col in rejected:
        assert shrunk["response_mask"][row, col] == 1
        shrunk["response_mask"][row, col] = 0
    assert_same(corrected, grads(worker, shrunk))


def test_a_fully_rejected_batch_gives_no_gradient(worker):
    corrected = grads(worker, with_rollout(torch.full((8, 12), 3.0)), "decoupled")
    assert all(torch.count_nonzero(g) == 0 for g in corrected.values())


def test_a_correction_without_rollout_log_probs_is_one_clear_error(worker):
    with pytest.raises(ValueError, match="actor.off_policy.correction=tis needs rollout_log_probs"):
        grads(worker, make_batch(), "tis")
