"""LoRA vs full fine-tuning: actor + reference memory and bytes shipped per weight sync.

For each model, side by side in one process:

* *full*: the actor ``PolicyWorker`` (all weights trainable, AdamW) plus the reference
  ``PolicyWorker`` (a second, frozen copy of the weights), as a full-weight KL run spawns them;
* *LoRA*: the actor ``PolicyWorker`` with ``actor.lora`` (frozen base, trainable adapters);
  its reference is the same base with the adapters off, so there is no second worker.

Each actor takes one real ``update_policy`` step on a small random batch first, so gradients
and AdamW state exist. Memory is the bytes of every distinct tensor storage the workers hold
as model state: weights, gradients and optimiser state (activations, which depend on the
batch, are left out and are about the same in both modes). Bytes per sync are the tensor
bytes of what ``publish_weights`` puts in the Ray object store: the full state dict, or the
adapters only (``actor.lora.sync=adapters``).

Models: the demo policy (``demo:tiny-char-lm``) and a Llama of SmolLM2-135M's shape (hidden
576, 30 layers, 9 heads / 3 KV heads, MLP 1536, vocabulary 49152, tied embeddings), randomly
initialised and saved with ``save_pretrained`` (weights do not change either figure), or a
real checkpoint with ``--model-path``.

    python benchmarks/lora_vs_full.py                 # defaults used in docs/benchmarks.md
    python benchmarks/lora_vs_full.py --model-path /models/SmolLM2-135M --rank 16
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile

import torch
from omegaconf import OmegaConf

from rlflow.config.compose import compose_config
from rlflow.data.batched_data_dict import BatchedDataDict
from rlflow.models.lora import lora_sync_state
from rlflow.utils.torch_functional import compute_position_ids
from rlflow.workers.policy import PolicyWorker

SMOLLM2_135M_SHAPE = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
    tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0,
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--target-modules", default="all-linear")
    p.add_argument("--model-path", action="append", default=None,
                   help="model folders to measure (default: the demo model and a SmolLM2-135M-shaped Llama)")
    return p.parse_args(argv)


def smollm2_shaped_model(root: str) -> str:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    path = os.path.join(root, "llama-135m-shape")
    AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2_135M_SHAPE, dtype="float32")).save_pretrained(path)
    return path


def storages(worker: PolicyWorker) -> dict[int, int]:
    """data_ptr -> bytes of every tensor the worker keeps as model state."""
    out: dict[int, int] = {}

    def add(t: torch.Tensor) -> None:
        if isinstance(t, torch.Tensor) and t.numel() > 0:
            out[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for p in worker.model.parameters():
        add(p)
        if p.grad is not None:
            add(p.grad)
    for b in worker.model.buffers():
        add(b)
    if worker.optimizer is not None:
        for state in worker.optimizer.state.values():
            for value in state.values():
                add(value)
    return out


def payload_bytes(state: dict[str, torch.Tensor]) -> int:
    seen = {t.untyped_storage().data_ptr(): t.numel() * t.element_size() for t in state.values()}
    return sum(seen.values())


def random_batch(vocab: int) -> BatchedDataDict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (4, 24), generator=gen)
    mask = torch.ones_like(ids)
    return BatchedDataDict(
        input_ids=ids, attention_mask=mask, position_ids=compute_position_ids(mask),
        responses=ids[:, 16:], response_mask=mask[:, 16:], advantages=torch.randn(4, 8, generator=gen),
    )


def measure(model_path: str, lora: bool, args: argparse.Namespace) -> dict[str, float]:
    overrides = [f"model.path={model_path}", "actor.use_kl_loss=false", "actor.torch_threads=2", "ref.torch_threads=2"]
    if lora:
        overrides += [f"actor.lora.rank={args.rank}", f"actor.lora.alpha={args.alpha}",
                      f"actor.lora.target_modules={args.target_modules}"]
    cfg = OmegaConf.to_container(compose_config("grpo", overrides), resolve=True)
    actor = PolicyWorker(cfg, role="actor")
    vocab = actor.model.get_input_embeddings().weight.shape[0]
    actor.update_policy(random_batch(vocab), 4)
    held = storages(actor)
    ref = None
    if not lora:
        ref = PolicyWorker(cfg, role="ref")
        held.update(storages(ref))
    shipped = lora_sync_state(actor.model, actor.cfg.actor.lora) if lora else actor.full_state_dict()
    result = {
        "memory_bytes": float(sum(held.values())),
        "sync_bytes": float(payload_bytes(shipped)),
        "trainable": float(sum(p.numel() for p in actor.model.parameters() if p.requires_grad)),
        "workers": 1.0 if lora else 2.0,
    }
    del actor, ref, shipped
    gc.collect()
    return result


def mib(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as root:
        paths = args.model_path or ["demo:tiny-char-lm", smollm2_shaped_model(root)]
        print(f"LoRA rank {args.rank}, alpha {args.alpha}, target modules {args.target_modules}; float32 weights")
        header = f"| model | mode | worker processes | trainable params | actor+ref memory | bytes per sync |"
        print(header + "\n|---|---|---|---|---|---|")
        for path in paths:
            full = measure(path, False, args)
            lora = measure(path, True, args)
            name = os.path.basename(path.rstrip("/")) or path
            for mode, r in (("full", full), (f"LoRA r{args.rank}", lora)):
                print(f"| {name} | {mode} | {int(r['workers'])} | {int(r['trainable']):,} | "
                      f"{mib(r['memory_bytes'])} | {mib(r['sync_bytes'])} |")
            print(f"| {name} | LoRA / full | | | {lora['memory_bytes'] / full['memory_bytes']:.1%} | "
                  f"{lora['sync_bytes'] / full['sync_bytes']:.2%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
