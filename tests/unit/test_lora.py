"""LoRA pieces without Ray: config checks, the adapters-off reference, merging, adapter folders."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

import rlflow
from rlflow.errors import ConfigError
from rlflow.models import lora
from rlflow.models.loading import load_causal_lm, resolve_model_path
from rlflow.trainer.config_checks import check_config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["actor.lora.enable=true"], "actor.lora.rank=0 must be > 0 when actor.lora.enable=true"),
        (["actor.lora.rank=-2"], "actor.lora.rank=-2 must be >= 0"),
        (["actor.lora.rank=8", "actor.lora.target_modules=[q_proj,qproj]"], "entry 'qproj' matches no module"),
        (["actor.lora.rank=8", "actor.lora.target_modules=[embed_tokens]"], "'embed_tokens' is Embedding, not a Linear"),
        (["actor.lora.rank=8", "actor.lora.target_modules=linear"], "actor.lora.target_modules=linear is not valid"),
        (["actor.lora.rank=8", "actor.lora.sync=full"], "actor.lora.sync='full' is not valid"),
        (["actor.lora.rank=8", "actor.lora.alpha=0"], "actor.lora.alpha=0.0 must be > 0"),
        (["actor.lora.rank=8", "rollout.weight_sync=nccl"], "use rollout.weight_sync=object_store"),
        (["actor.lora.rank=8", "actor.lora.sync=merged", "actor.lora.target_modules=[q_proj,lm_head]"],
         "tied input and output embeddings"),
    ],
)
def test_bad_lora_settings_are_one_line_errors(overrides, message):
    cfg = rlflow.compose_config("grpo", overrides)
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_lora_is_on_by_rank_or_flag_and_targets_resolve_on_the_model():
    assert not lora.lora_enabled(rlflow.compose_config("grpo").actor.lora)
    cfg = rlflow.compose_config("grpo", ["actor.lora.enable=true", "actor.lora.rank=4"])
    check_config(cfg)
    assert lora.lora_enabled(cfg.actor.lora)
    model = lora.meta_model(cfg.model)
    assert lora.resolve_target_modules(model, cfg.actor.lora) == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj",
    ]
    cfg.actor.lora.target_modules = ["v_proj", "lm_head"]
    assert lora.resolve_target_modules(model, cfg.actor.lora) == ["lm_head", "v_proj"]
    dpo = rlflow.compose_config("dpo", ["actor.lora.rank=4", "actor.lora.target_modules=[nope]"])
    with pytest.raises(ConfigError, match="'nope' matches no module"):
        check_config(dpo)


def _lora_model(targets="all-linear", seed=0):
    cfg = rlflow.compose_config("grpo", ["actor.lora.rank=4", "actor.lora.alpha=8"])
    cfg.actor.lora.target_modules = targets
    model = lora.add_lora_adapters(load_causal_lm(cfg.model), cfg.actor.lora)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if lora.is_adapter_key(name):
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))
    return cfg, model.eval()


IDS = torch.tensor([[3, 5, 7, 9, 11, 2], [4, 4, 8, 1, 6, 10]])


def test_only_adapters_train_and_disabling_them_gives_the_base_model():
    cfg = rlflow.compose_config("grpo", ["actor.lora.rank=4"])
    base = load_causal_lm(cfg.model).eval()
    fresh = lora.add_lora_adapters(load_causal_lm(cfg.model), cfg.actor.lora).eval()
    trainable = [n for n, p in fresh.named_parameters() if p.requires_grad]
    assert trainable and all(lora.is_adapter_key(n) for n in trainable)
    # B starts at zero: the adapted model starts as the base
    assert torch.equal(fresh(IDS).logits, base(IDS).logits)

    _, model = _lora_model()
    adapted = model(IDS).logits
    assert (adapted - base(IDS).logits).abs().max() > 1e-2
    with lora.adapters_disabled(model):
        assert torch.equal(model(IDS).logits, base(IDS).logits)
    assert torch.equal(model(IDS).logits, adapted)
    assert all(p.requires_grad for n, p in model.named_parameters() if lora.is_adapter_key(n))


@pytest.mark.parametrize("targets", ["all-linear", ["v_proj", "down_proj", "lm_head"]])
def test_merged_weights_and_adapter_folder_reproduce_the_adapted_model(tmp_path, targets):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, model = _lora_model(OmegaConf.create({"t": targets}).t if not isinstance(targets, str) else targets)
    adapted = model(IDS).logits

    # W + alpha / r * B @ A, written out here for one layer
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    merged = lora.merge_adapters(state, lora.lora_scaling(cfg.actor.lora))
    layer = "model.layers.1.self_attn.v_proj"
    a, b = state[f"{layer}.lora_A.default.weight"], state[f"{layer}.lora_B.default.weight"]
    expected = state[f"{layer}.base_layer.weight"] + (8 / 4) * b @ a
    assert torch.allclose(merged[f"{layer}.weight"], expected, atol=1e-6)
    if "lm_head" not in targets:  # a merged lm_head cannot live in a tied-embedding model
        plain = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model.path)).eval()
        missing, unexpected = plain.load_state_dict(merged, strict=False)
        assert not unexpected and all(k.endswith("lm_head.weight") for k in missing)
        assert (plain(IDS).logits - adapted).abs().max() < 1e-4

    # the adapter folder loads with peft onto a freshly loaded base
    folder = lora.write_adapter_folder(str(tmp_path / "adapter"), lora.adapter_state(model), cfg.actor.lora,
                                       resolve_model_path(cfg.model.path))
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model.path))
    peft_model = PeftModel.from_pretrained(base, folder).eval()
    assert (peft_model(IDS).logits - adapted).abs().max() < 1e-5


def test_merged_export_unties_an_adapted_lm_head(tmp_path):
    from transformers import AutoModelForCausalLM

    from rlflow.export import export_merged_lora

    cfg, model = _lora_model(OmegaConf.create({"t": ["q_proj", "lm_head"]}).t)
    adapted = model(IDS).logits
    folder = lora.write_adapter_folder(str(tmp_path / "adapter"), lora.adapter_state(model), cfg.actor.lora,
                                       resolve_model_path(cfg.model.path))
    merged_dir = export_merged_lora(folder, cfg.model, str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert merged.lm_head.weight.data_ptr() != merged.model.embed_tokens.weight.data_ptr()
    assert (merged(IDS).logits - adapted).abs().max() < 1e-4
