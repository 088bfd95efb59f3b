"""The LoRA actor on two FSDP2 ranks (real gloo process group, two spawned processes).

After a real update the adapters are non-zero; then, in every micro-batching layout (padded,
dynamic batching, packing):

* the reference log-probs (``compute_log_prob(reference=True)``: adapters off) equal the base
  model's, computed here per sequence on a freshly loaded base;
* the actor's log-probs equal those of the base with the gathered adapters applied by peft;
* the adapter gradient on two ranks equals the one-rank, one-micro-batch gradient.

The checkpoint holds only the adapters (and their optimiser state) and restores the policy
exactly on a fresh single-rank worker, also after reference passes (adapters off) came
between the updates.
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

PROMPT_W, RESP_W = 6, 6
PROMPTS = [6, 4, 5, 2, 3, 1, 6, 2]
RESPONSES = [6, 5, 2, 6, 1, 3, 4, 2]
LAYOUTS = {
    "padded": {},
    "dynamic": {"use_dynamic_bsz": True, "max_tokens_per_microbatch": 24, "sequence_length_round": 4},
    "packing": {"use_sequence_packing": True, "max_tokens_per_microbatch": 20},
}


def make_model_dir(root: str) -> str:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=41, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
    )
    path = os.path.join(root, "tiny-llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def make_config(model_dir: str) -> dict:
    cfg = compose_config("grpo", [
        f"model.path={model_dir}", "actor.torch_threads=1", "rollout.temperature=1.0",
        "actor.use_kl_loss=false", "actor.optim.lr=0.05", "actor.lora.rank=4", "actor.lora.alpha=8",
    ])
    return OmegaConf.to_container(cfg, resolve=True)


def make_batch() -> BatchedDataDict:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 41, (len(PROMPTS), PROMPT_W + RESP_W), generator=gen)
    mask = torch.zeros_like(ids)
    for b, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        mask[b, PROMPT_W - p : PROMPT_W + r] = 1
    return BatchedDataDict(
        input_ids=ids, attention_mask=mask, position_ids=compute_position_ids(mask),
        responses=ids[:, PROMPT_W:], response_mask=mask[:, PROMPT_W:].clone(),
        advantages=torch.randn(len(PROMPTS), RESP_W, generator=gen),
    )


def set_layout(worker, layout: str) -> None:
    opts = LAYOUTS[layout]
    actor = worker.cfg.actor
    actor.use_dynamic_bsz = opts.get("use_dynamic_bsz", False)
    actor.use_sequence_packing = opts.get("use_sequence_packing", False)
    actor.max_tokens_per_microbatch = opts.get("max_tokens_per_microbatch", 4096)
    actor.sequence_length_round = opts.get("sequence_length_round", 1)


def _dp_worker(rank: int, world: int, port: int, model_dir: str, root: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from rlflow.models.lora import adapter_state
    from rlflow.workers.policy import PolicyWorker

    worker = PolicyWorker(make_config(model_dir), role="actor")
    half = len(PROMPTS) // world
    shard = make_batch().slice(rank * half, (rank + 1) * half)
    # as in a training step: the reference log-probs first, then the update
    worker.compute_log_prob(shard, 2, reference=True)
    worker.update_policy(shard, half)
    out = {"adapters": adapter_state(worker.model)}
    for layout in LAYOUTS:
        set_layout(worker, layout)
        out[("actor", layout)] = worker.compute_log_prob(shard, 2)["log_probs"]
        out[("ref", layout)] = worker.compute_log_prob(shard, 2, reference=True)["log_probs"]
        out[("grads", layout)] = worker.accumulate_gradients(shard)
    worker.save_checkpoint(os.path.join(root, "ckpt"))
    torch.save(out, os.path.join(root, f"rank{rank}.pt"))
    worker.destroy_distributed()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("lora"))
    model_dir = make_model_dir(root)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_dp_worker, args=(2, port, model_dir, root), nprocs=2, join=True)
    ranks = [torch.load(os.path.join(root, f"rank{r}.pt")) for r in range(2)]
    merged = {key: torch.cat([ranks[0][key], ranks[1][key]]) for key in ranks[0] if key[0] in ("actor", "ref")}
    return model_dir, root, ranks, merged


def naive_log_probs(model: torch.nn.Module, batch: BatchedDataDict) -> torch.Tensor:
    """Per sequence, no padding: log p(response token t | prompt and response tokens < t)."""
    out = torch.zeros(batch.size, RESP_W)
    with torch.no_grad():
        for b in range(batch.size):
            seq = batch["input_ids"][b][batch["attention_mask"][b].bool()]
            p, r = PROMPTS[b], RESPONSES[b]
            logp = model(input_ids=seq[None]).logits[0].float().log_softmax(-1)
            out[b, :r] = logp[p - 1 : p + r - 1].gather(-1, seq[p : p + r, None]).squeeze(-1)
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_reference_is_the_base_model_and_actor_is_base_plus_adapters(two_ranks, layout):
    from rlflow.models.lora import add_lora_adapters

    model_dir, _, ranks, merged = two_ranks
    batch = make_batch()
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    base_lp = naive_log_probs(base, batch)
    assert (merged[("ref", layout)] - base_lp).abs().max() < 1e-5

    adapted = add_lora_adapters(AutoModelForCausalLM.from_pretrained(model_dir), OmegaConf.create(make_config(model_dir)).actor.lora)
    missing, unexpected = adapted.load_state_dict(ranks[0]["adapters"], strict=False)
    assert not unexpected
    adapted_lp = naive_log_probs(adapted.eval(), batch)
    assert (merged[("actor", layout)] - adapted_lp).abs().max() < 1e-5
    assert (adapted_lp - base_lp).abs().max() > 1e-2, "the update did not move the adapters"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_adapter_gradients_on_two_ranks_match_one_rank(two_ranks, layout):
    from rlflow.workers.policy import PolicyWorker

    model_dir, root, ranks, _ = two_ranks
    worker = PolicyWorker(make_config(model_dir), role="actor")
    worker.load_checkpoint(os.path.join(root, "ckpt"))
    reference = worker.accumulate_gradients(make_batch())
    grads = ranks[0][("grads", layout)]
    assert grads.keys() == reference.keys() and all(".lora_" in k for k in grads)
    for name, value in reference.items():
        assert torch.allclose(grads[name], value, rtol=1e-4, atol=1e-7), name


def test_checkpoint_holds_adapters_and_restores_the_policy_exactly(two_ranks):
    from safetensors.torch import load_file

    from rlflow.workers.policy import PolicyWorker

    model_dir, root, _, merged = two_ranks
    ckpt = os.path.join(root, "ckpt")
    saved = load_file(os.path.join(ckpt, "model.safetensors"))
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    optim = torch.load(os.path.join(ckpt, "optimizer.pt"), weights_only=True)
    assert len(optim["state"]) == len(saved)
    worker = PolicyWorker(make_config(model_dir), role="actor")
    worker.load_checkpoint(ckpt)
    assert torch.equal(worker.compute_log_prob(make_batch(), 8)["log_probs"], merged[("actor", "padded")])
