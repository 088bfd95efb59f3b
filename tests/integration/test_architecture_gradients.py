"""FSDP2 sharding of decoder blocks other than ``model.layers`` (GPT-2's ``transformer.h``,
OPT's ``model.decoder.layers``) and packed sliding-window attention (Gemma2, window 8 shorter
than the rows) give the same actor gradient on two ranks as one micro-batch on one rank."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from tiny_models import build_tiny_model
from test_gradient_invariance import TOL, _free_port, make_batch, make_config, set_mode

ARCHS = ("gpt2", "opt", "gemma2")
MODES = ("micro_batch_2", "packing")


def batch_for(vocab: int):
    batch = make_batch()
    for key in ("input_ids", "responses"):
        batch[key] = batch[key] % vocab
    return batch


def rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest per-tensor difference relative to the reference tensor's largest entry. A
    gradient that is zero in exact arithmetic (OPT's key bias: softmax ignores a constant
    added to every logit of a row) is rounding noise, so each scale is at least 1e-4 of
    the largest gradient entry."""
    assert a.keys() == b.keys()
    floor = 1e-4 * max(t.abs().max().item() for t in b.values())
    return max(((a[k] - b[k]).abs().max() / max(b[k].abs().max().item(), floor)).item() for k in b)


def _two_ranks(rank: int, world: int, port: int, model_dir: str, out_path: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from rlflow.workers.policy import PolicyWorker

    worker = PolicyWorker(make_config(model_dir), role="actor")
    batch = batch_for(worker.model.config.vocab_size)
    shard = batch.slice(4 * rank, 4 * rank + 4)
    results = {}
    for mode in MODES:
        set_mode(worker, mode, "token-mean")
        results[mode] = worker.accumulate_gradients(shard)
    if rank == 0:
        torch.save(results, out_path)
    worker.destroy_distributed()


@pytest.mark.parametrize("arch", ARCHS)
def test_two_sharded_ranks_match_one_rank(tmp_path, arch):
    from rlflow.workers.policy import PolicyWorker

    model_dir = build_tiny_model(str(tmp_path), arch)
    worker = PolicyWorker(make_config(model_dir), role="actor")
    set_mode(worker, "one_micro_batch", "token-mean")
    reference = worker.accumulate_gradients(batch_for(worker.model.config.vocab_size))
    out_path = str(tmp_path / "dp2.pt")
    mp.spawn(_two_ranks, args=(2, _free_port(), model_dir, out_path), nprocs=2, join=True)
    for mode, grads in torch.load(out_path).items():
        assert rel_diff(grads, reference) <= TOL, mode
