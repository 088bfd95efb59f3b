"""Tiny random-init models of several transformers architectures for tests.

A module of its own (not conftest.py) so that worker processes started by a test import it
by a name no other test folder shadows.
"""

from __future__ import annotations

import os

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
