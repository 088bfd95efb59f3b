"""Fixtures for the vLLM backend tests (run by `make test-vllm` in .venv-vllm).

These tests need a vLLM install, which the main environment deliberately does not have:
where ``import vllm`` cannot work the folder is left out of collection, so `make test` in
.venv stays green. `make test-vllm` sets RLFLOW_REQUIRE_VLLM=1, and then a missing vLLM is an
error instead of an empty run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rlflow.workers.rollout import vllm_installed

if not vllm_installed():
    if os.environ.get("RLFLOW_REQUIRE_VLLM") == "1":
        raise RuntimeError("RLFLOW_REQUIRE_VLLM=1 but vllm is not importable: run `make test-vllm`")
    collect_ignore_glob = ["test_*.py"]

# vLLM's CPU attention has kernels for head sizes 32, 64, ... but not the demo model's 16, so
# these tests use the demo's tokenizer and sizes with 2 heads of 32 instead of 4 of 16.
TINY_HEADS = 2


def build_tiny_llama(folder: Path) -> Path:
    """A random-init LlamaForCausalLM (float32, head size 32) with the demo char tokenizer."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from rlflow.demo import assets

    tokenizer = assets.build_demo_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=assets.HIDDEN_SIZE,
        intermediate_size=assets.INTERMEDIATE_SIZE,
        num_hidden_layers=assets.NUM_HIDDEN_LAYERS,
        num_attention_heads=TINY_HEADS,
        num_key_value_heads=TINY_HEADS,
        max_position_embeddings=assets.MAX_POSITION_EMBEDDINGS,
        initializer_range=assets.INITIALIZER_RANGE,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-hd32")))
