"""The actor's accumulated gradient does not depend on how a mini-batch is cut up.

One fixed batch with ragged prompt and response lengths; the gradient of the full actor loss
(clipped PG + entropy bonus + k3 KL) taken as one micro-batch must equal, within 1e-5
relative, the gradient with micro-batch size 1, with dynamic batching, with sequence packing,
and with two FSDP2 data-parallel ranks (real gloo process group, two spawned processes) in
every micro-batching mode, including uneven shards whose ranks must add idle steps. It must
also equal a direct per-sequence implementation of the loss written out in this file.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, LlamaConfig

from rlflow.config.compose import compose_config
from rlflow.data.batched_data_dict import BatchedDataDict
from rlflow.utils.torch_functional import compute_position_ids

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
TOL = 1e-5
PROMPT_W, RESP_W = 8, 12
# Rows 0-3 (rank 0's shard) are long, rows 4-7 short, so the token-capped plans differ per rank.
PROMPTS = [8, 6, 7, 5, 2, 3, 1, 4]
RESPONSES = [12, 11, 9, 12, 3, 1, 5, 2]
CLIP, ENT_COEF, KL_COEF = 0.2, 0.01, 0.05
# mode name -> (config overrides, micro-batch size)
MODES = {
    "one_micro_batch": ({}, 8),
    "micro_batch_1": ({}, 1),
    "micro_batch_2": ({}, 2),
    "dynamic": ({"use_dynamic_bsz": True, "max_tokens_per_microbatch": 48, "sequence_length_round": 4}, 8),
    "packing": ({"use_sequence_packing": True, "max_tokens_per_microbatch": 40}, 8),
}


# --------------------------------------------------------------------------- fixtures
def make_model_dir(root: str) -> str:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=53, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    model = AutoModelForCausalLM.from_config(config)
    path = os.path.join(root, "tiny-llama")
    model.save_pretrained(path)
    return path


def make_config(model_dir: str) -> dict:
    cfg = compose_config("grpo", [
        f"model.path={model_dir}", "actor.torch_threads=1", "rollout.temperature=1.0",
        f"actor.clip_ratio_low={CLIP}", f"actor.clip_ratio_high={CLIP}",
        f"actor.entropy_coeff={ENT_COEF}", "actor.use_kl_loss=true", f"actor.kl_loss_coef={KL_COEF}",
        "actor.kl_loss_type=k3", "actor.optim.lr=0.0",
    ])
    return OmegaConf.to_container(cfg, resolve=True)


def make_batch() -> BatchedDataDict:
    gen = torch.Generator().manual_seed(7)
    batch = len(PROMPTS)
    ids = torch.randint(0, 53, (batch, PROMPT_W + RESP_W), generator=gen)
    mask = torch.zeros(batch, PROMPT_W + RESP_W, dtype=torch.long)
    for b, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        mask[b, PROMPT_W - p : PROMPT_W] = 1
        mask[b, PROMPT_W : PROMPT_W + r] = 1
    resp_mask = mask[:, PROMPT_W:].clone()
    return BatchedDataDict(
        input_ids=ids,
        attention_mask=mask,
        position_ids=compute_position_ids(mask),
        responses=ids[:, PROMPT_W:],
        response_mask=resp_mask,
        advantages=torch.randn(batch, RESP_W, generator=gen),
        # far enough from the current policy that some ratios are clipped
        old_log_probs=-3.0 + 0.5 * torch.randn(batch, RESP_W, generator=gen),
        ref_log_probs=-3.0 + 0.5 * torch.randn(batch, RESP_W, generator=gen),
    )


def set_mode(worker, mode: str, agg: str) -> int:
    overrides, micro = MODES[mode]
    actor = worker.cfg.actor
    actor.loss_agg_mode = agg
    actor.ppo_micro_batch_size_per_worker = micro
    actor.use_dynamic_bsz = overrides.get("use_dynamic_bsz", False)
    actor.use_sequence_packing = overrides.get("use_sequence_packing", False)
    actor.max_tokens_per_microbatch = overrides.get("max_tokens_per_microbatch", 4096)
    actor.sequence_length_round = overrides.get("sequence_length_round", 1)
    return micro


def rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)).item() for k in b)


# --------------------------------------------------------------------------- 2 ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dp_worker(rank: int, world: int, port: int, model_dir: str, out_path: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    from rlflow.workers.policy import PolicyWorker

    worker = PolicyWorker(make_config(model_dir), role="actor")
    batch = make_batch()
    results = {}
    # even shards (4 + 4 rows, as WorkerGroup gives) in every mode; uneven shards (6 + 2) with
    # dynamic batching and packing, where rank 1 runs out of rows and must add idle steps
    cases = [(mode, (4, 4)) for mode in ("micro_batch_2", "dynamic", "packing")]
    cases += [("dynamic", (6, 2)), ("packing", (6, 2))]
    for mode, split in cases:
        start = 0 if rank == 0 else split[0]
        shard = batch.slice(start, start + split[rank])
        for agg in AGG_MODES:
            set_mode(worker, mode, agg)
            steps = len(worker.plan_micro_batches(shard, MODES[mode][1])[1])
            grads = worker.accumulate_gradients(shard)
            results[(mode, split, agg)] = (grads, steps)
    if rank == 0:
        torch.save(results, out_path)
    worker.destroy_distributed()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("grad"))
    model_dir = make_model_dir(root)
    return model_dir, make_config(model_dir), make_batch(), root


@pytest.fixture(scope="module")
def single_rank_grads(setup):
    from rlflow.workers.policy import PolicyWorker

    model_dir, config, batch, _ = setup
    worker = PolicyWorker(config, role="actor")
    # packing runs rlflow's per-sequence sdpa here; the 4-D mask kinds are covered in
    # tests/unit/test_packing.py
    assert worker.mask_kind == "varlen"
    out = {}
    for mode in MODES:
        for agg in AGG_MODES:
            set_mode(worker, mode, agg)
            steps = len(worker.plan_micro_batches(batch, MODES[mode][1])[1])
            out[(mode, agg)] = (worker.accumulate_gradients(batch), steps)
    return out


@pytest.fixture(scope="module")
def two_rank_grads(setup):
    model_dir, _, _, root = setup
    out_path = os.path.join(root, "dp2.pt")
    mp.spawn(_dp_worker, args=(2, _free_port(), model_dir, out_path), nprocs=2, join=True)
    return torch.load(out_path)


# --------------------------------------------------------------------------- a direct loss
def direct_loss(model: torch.nn.Module, batch: BatchedDataDict, agg: str) -> torch.Tensor:
    """The actor loss written out per sequence, with no padding and no library helpers."""
    per_seq, tokens = [], 0
    for b in range(batch.size):
        seq = batch["input_ids"][b][batch["attention_mask"][b].bool()]
        p, r = PROMPTS[b], RESPONSES[b]
        logp_all = model(input_ids=seq[None]).logits[0].float().log_softmax(-1)
        rows = logp_all[p - 1 : p + r - 1]
        logp = rows.gather(-1, seq[p : p + r, None]).squeeze(-1)
        entropy = -(rows.exp() * rows).sum(-1)
        adv = batch["advantages"][b, :r]
        ratio = torch.exp(logp - batch["old_log_probs"][b, :r])
        pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP, 1 + CLIP))
        d = batch["ref_log_probs"][b, :r] - logp
        kl = torch.exp(d) - d - 1
        per_token = pg - ENT_COEF * entropy + KL_COEF * kl
        per_seq.append(per_token)
        tokens += r
    if agg == "token-mean":
        return sum(t.sum() for t in per_seq) / tokens
    if agg == "seq-mean-token-mean":
        return sum(t.mean() for t in per_seq) / len(per_seq)
    return sum(t.sum() for t in per_seq) / len(per_seq)


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("agg", AGG_MODES)
def test_one_micro_batch_matches_direct_loss(setup, single_rank_grads, agg):
    model_dir, _, batch, _ = setup
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.train()
    direct_loss(model, batch, agg).backward()
    direct = {n: p.grad for n, p in model.named_parameters()}
    grads, steps = single_rank_grads[("one_micro_batch", agg)]
    assert steps == 1
    assert rel_diff(grads, direct) <= TOL


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("mode", ["micro_batch_1", "micro_batch_2", "dynamic", "packing"])
def test_single_rank_micro_batching_is_invariant(single_rank_grads, mode, agg):
    ref, _ = single_rank_grads[("one_micro_batch", agg)]
    grads, steps = single_rank_grads[(mode, agg)]
    assert steps > 1  # the batch really was cut up
    assert rel_diff(grads, ref) <= TOL


def test_modes_differ_from_each_other(single_rank_grads):
    # the aggregation modes weight tokens differently, so their gradients must differ: the
    # invariance above is not an artefact of the loss ignoring loss_agg_mode
    grads = [single_rank_grads[("one_micro_batch", agg)][0] for agg in AGG_MODES]
    assert rel_diff(grads[0], grads[1]) > 1e-2 and rel_diff(grads[1], grads[2]) > 1e-2


@pytest.mark.parametrize("agg", AGG_MODES)
def test_two_ranks_match_one_micro_batch(single_rank_grads, two_rank_grads, agg):
    ref, _ = single_rank_grads[("one_micro_batch", agg)]
    for (mode, split, mode_agg), (grads, steps) in two_rank_grads.items():
        if mode_agg != agg:
            continue
        if mode == "micro_batch_2":
            assert steps == 2
        assert rel_diff(grads, ref) <= TOL, (mode, split)


def test_uneven_shards_run_idle_steps(two_rank_grads):
    # rank 0 holds 6 long rows: a cap of 40-48 tokens needs more steps than rank 1's 2 rows
    # can fill, so rank 1 (and the count rank 0 reports) must include idle steps
    for mode in ("dynamic", "packing"):
        _, steps = two_rank_grads[(mode, (6, 2), "token-mean")]
        assert steps > 2, mode
