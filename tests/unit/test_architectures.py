"""Architecture support: decoder blocks for FSDP2, the attention implementation, dropout, and
the driver-side checks that turn unsupported combinations into one-line config errors."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from tiny_models import TINY_ARCHITECTURES, build_tiny_model
from rlflow.config.compose import compose_config
from rlflow.data.batched_data_dict import BatchedDataDict
from rlflow.errors import ConfigError
from rlflow.models.architecture import check_model_support
from rlflow.models.loading import load_causal_lm
from rlflow.utils.torch_functional import compute_position_ids
from rlflow.workers.critic import load_value_model
from rlflow.workers.fsdp import decoder_blocks


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = str(tmp_path_factory.mktemp("archs"))
    return {arch: build_tiny_model(root, arch) for arch in TINY_ARCHITECTURES}


def config(model_path: str, *overrides: str):
    return compose_config("grpo", [f"model.path={model_path}", *overrides])


# Where each architecture keeps its decoder blocks.
BLOCK_LISTS = {
    "llama": lambda m: m.model.layers,
    "qwen2": lambda m: m.model.layers,
    "mistral": lambda m: m.model.layers,
    "gemma2": lambda m: m.model.layers,
    "gpt2": lambda m: m.transformer.h,
    "opt": lambda m: m.model.decoder.layers,
}


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_decoder_blocks_are_found_wherever_the_model_keeps_them(models, arch):
    model = load_causal_lm(config(models[arch]).model)
    expected = list(BLOCK_LISTS[arch](model))
    assert len(expected) == 2
    assert [id(b) for b in decoder_blocks(model)] == [id(b) for b in expected]
    # the critic wraps the backbone in a value model: the same blocks, one level down
    value_model = load_value_model(config(models[arch]).model, models[arch])
    assert len(decoder_blocks(value_model)) == 2


def test_no_blocks_found_for_a_plain_module():
    assert decoder_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2))) == []


def test_auto_attention_picks_what_the_model_supports(models):
    assert load_causal_lm(config(models["llama"]).model).config._attn_implementation == "sdpa"
    # Gemma2 soft-caps attention logits, which sdpa cannot: auto means eager for it
    assert load_causal_lm(config(models["gemma2"]).model).config._attn_implementation == "eager"
    eager = config(models["llama"], "model.attn_implementation=eager").model
    assert load_causal_lm(eager).config._attn_implementation == "eager"


@pytest.mark.parametrize(
    "arch,overrides,needle",
    [
        ("gemma2", ["model.attn_implementation=sdpa"], "set model.attn_implementation=eager"),
        ("llama", ["model.attn_implementation=flash"], "model.attn_implementation='flash' is not valid"),
        ("llama", ["model.attn_implementation=flex_attention", "actor.use_sequence_packing=true"],
         "set model.attn_implementation=auto, or actor.use_sequence_packing=false"),
    ],
)
def test_unsupported_settings_fail_in_the_driver(models, arch, overrides, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")) as err:
        check_model_support(config(models[arch], *overrides))
    assert "\n" not in str(err.value)


def test_sharding_a_model_without_declared_blocks_names_the_setting(tmp_path):
    from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel

    from rlflow.demo.assets import build_demo_tokenizer

    OpenAIGPTLMHeadModel(OpenAIGPTConfig(vocab_size=30, n_embd=32, n_layer=1, n_head=2)).save_pretrained(tmp_path / "gpt")
    build_demo_tokenizer().save_pretrained(tmp_path / "gpt")
    with pytest.raises(ConfigError, match="declares no decoder blocks.*set actor.num_workers=1"):
        check_model_support(config(str(tmp_path / "gpt"), "actor.num_workers=2"))
    check_model_support(config(str(tmp_path / "gpt")))  # the recipe's one worker shards nothing


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_supported_architectures_pass_the_driver_checks(models, arch):
    check_model_support(config(models[arch], "actor.use_sequence_packing=true", "ref.use_sequence_packing=true"))


def dropout_batch(vocab: int) -> BatchedDataDict:
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[0, :3] = 0
    mask[2, 10:] = 0
    ids = torch.randint(0, vocab, (4, 12), generator=gen)
    return BatchedDataDict(input_ids=ids, attention_mask=mask, position_ids=compute_position_ids(mask),
                           responses=ids[:, 6:], response_mask=mask[:, 6:])


@pytest.mark.parametrize("disable_dropout", [True, False])
def test_dropout_is_off_in_the_update_unless_kept(models, disable_dropout):
    from rlflow.workers.policy import PolicyWorker

    cfg = config(models["gpt2"], "actor.num_workers=1", f"model.disable_dropout={disable_dropout}")
    worker = PolicyWorker(OmegaConf.to_container(cfg, resolve=True), role="actor")
    assert worker.model.config.resid_pdrop == (0.0 if disable_dropout else 0.1)  # GPT-2's default is 0.1
    batch = dropout_batch(worker.model.config.vocab_size)
    scored = batch["response_mask"].bool()
    logged = worker.compute_log_prob(batch, micro_batch_size=4)["log_probs"]
    assert not worker.model.training  # scoring runs in eval mode
    worker.model.train()  # as update_policy does on entry
    torch.manual_seed(1)
    with torch.no_grad():
        update_mode, _ = worker._forward(batch, "padded", with_entropy=False)
    if disable_dropout:
        assert torch.equal(update_mode[scored], logged[scored])
    else:
        assert (update_mode[scored] - logged[scored]).abs().max() > 1e-3
