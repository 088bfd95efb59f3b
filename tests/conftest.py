"""Shared pytest fixtures."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

# The real model and datasets of tests/real are fetched once into the user's rlflow cache and
# reused by every run; fix their folder before the private cache below replaces RLFLOW_CACHE.
if not os.environ.get("RLFLOW_REAL_PARTS"):
    from tools.real_parts import real_parts_root

    os.environ["RLFLOW_REAL_PARTS"] = str(real_parts_root())

# Demo assets (tiny model, parquet) are built once per test session in a private cache, never
# in the user's ~/.cache; set at import so every Ray worker started later inherits it.
os.environ.setdefault("RLFLOW_CACHE", tempfile.mkdtemp(prefix="rlflow-test-cache-"))

# Session-wide Ray settings: 2 CPUs matches the workplace machines and CI.
RAY_TEST_NUM_CPUS = 2


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[dict]:
    """A local Ray cluster (``RAY_TEST_NUM_CPUS`` CPUs) shared by the whole session.

    Yields ``ray.cluster_resources()``. Ray runs with a private HOME and temp dir, so it
    neither reads nor writes ``~/.ray`` (auth tokens) or the shared ``/tmp/ray`` of other
    clusters on the machine, and with ``RAY_AUTH_MODE`` set explicitly.
    """
    import ray

    from rlflow.distributed.ray_cluster import init_ray, shutdown_ray

    if ray.is_initialized():
        raise RuntimeError("Ray is already initialised in the test process; use the ray_cluster fixture only")
    # Short path: Ray's Unix sockets live under it and are limited to ~100 characters.
    root = tempfile.mkdtemp(prefix="rlflow-ray-", dir="/tmp")
    saved = {k: os.environ.get(k) for k in ("HOME", "RAY_AUTH_MODE", "RAY_ADDRESS")}
    os.environ.pop("RAY_ADDRESS", None)  # never join a cluster the developer has running
    os.environ["HOME"] = root  # Ray's processes, started now, keep this HOME
    try:
        resources = init_ray(num_cpus=RAY_TEST_NUM_CPUS, temp_dir=os.path.join(root, "ray"))
    finally:
        # The test process itself goes back to the real HOME (caches, configs).
        if saved["HOME"] is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = saved["HOME"]
    try:
        yield resources
    finally:
        shutdown_ray()
        for key, value in saved.items():
            if key == "HOME":
                continue
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(root, ignore_errors=True)


# Tiny random-init models of several transformers architectures, with the demo's character
# tokenizer; each is a real HF folder written with save_pretrained. Mistral and Gemma2 get a
# sliding window (8) shorter than the demo's prompt + response, so the window matters.
TINY_ARCHITECTURES = ("llama", "qwen2", "mistral", "gpt2", "gemma2", "opt")


def build_tiny_model(root: str, arch: str, **config_overrides) -> str:
    """Write a tiny ``arch`` causal LM (2 layers, hidden 64, 2 heads of 32) and the demo
    tokenizer to ``root/arch``; returns the folder."""
    import torch
    import transformers

    from rlflow.demo.assets import build_demo_tokenizer

    tokenizer = build_demo_tokenizer()
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    decoder = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=2, max_position_embeddings=128)
    configs = {
        "llama": lambda: transformers.LlamaConfig(**ids, **decoder),
        "qwen2": lambda: transformers.Qwen2Config(**ids, **decoder),
        "mistral": lambda: transformers.MistralConfig(**ids, **decoder, sliding_window=8),
        "gemma2": lambda: transformers.Gemma2Config(**ids, **decoder, head_dim=32, sliding_window=8),
        "gpt2": lambda: transformers.GPT2Config(**ids, n_embd=64, n_layer=2, n_head=2, n_positions=128),
        "opt": lambda: transformers.OPTConfig(**ids, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                              num_attention_heads=2, max_position_embeddings=128,
                                              word_embed_proj_dim=64),
    }
    config = configs[arch]()
    for key, value in config_overrides.items():
        setattr(config, key, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
    folder = os.path.join(root, arch)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
