"""``ref.in_actor``: the actor's workers hold a frozen copy of the initial weights and score the
reference policy with it (one rank, tiny Llama, no Ray): the same numbers as a reference worker
of its own, before and after the actor's weights move."""

from __future__ import annotations

import torch

from test_gradient_invariance import make_batch, make_config, make_model_dir


def test_reference_copy_matches_a_ref_worker_and_stays_frozen(tmp_path):
    from rlflow.workers.policy import PolicyWorker

    config = make_config(make_model_dir(str(tmp_path)))
    config["actor"]["optim"]["lr"] = 1e-2
    actor = PolicyWorker(config, role="actor", total_steps=2, with_reference=True)
    ref = PolicyWorker(config, role="ref")
    batch = make_batch()

    expected = ref.compute_log_prob(batch, micro_batch_size=4)["log_probs"]
    before = actor.compute_log_prob(batch, micro_batch_size=4, reference=True)["log_probs"]
    torch.testing.assert_close(before, expected, rtol=0, atol=1e-6)
    assert actor.model.training, "scoring the reference leaves the actor in training mode"

    batch["advantages"] = torch.linspace(-1, 1, batch.size)[:, None] * batch["response_mask"]
    batch["ref_log_probs"] = expected
    actor.update_policy(batch, mini_batch_size=batch.size)
    moved = actor.compute_log_prob(batch, micro_batch_size=4)["log_probs"]
    after = actor.compute_log_prob(batch, micro_batch_size=4, reference=True)["log_probs"]
    mask = batch["response_mask"].bool()
    assert (moved - expected).abs()[mask].max() > 1e-3, "the actor's weights moved"
    torch.testing.assert_close(after, expected, rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in actor.reference.parameters())
