"""The tool-use demo assets: warm-started tool model, its tokenizer and template, calculator data.

The real asset's behaviour (tool-call rate, copy accuracy) is measured by
benchmarks/tool_model_check.py; here the model is built with a few SFT steps to stay fast.
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from rlflow.demo import assets, tool_model
from rlflow.rewards.arithmetic import compute_score
from rlflow.utils.bundled import import_data_preprocess

SHORT_SFT_STEPS = 5
DEMO_TOKENS = ["<pad>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", *"0123456789+-*=() ."]
TOOL_CONVERSATION = [
    {"role": "user", "content": "37+58="},
    {"role": "assistant", "content": "<tool_call>37+58</tool_call>"},
    {"role": "tool", "content": "95"},
    {"role": "assistant", "content": "95"},
]
TOOL_CONVERSATION_TEXT = (
    "<|user|>37+58=<|end|><|assistant|><tool_call>37+58</tool_call><|end|>"
    "<|tool|>95<|end|><|assistant|>95<|end|>"
)

calculator = import_data_preprocess("calculator")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("RLFLOW_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def tool_model_dir(tmp_path_factory):
    # Built once for the module, in its own cache, with a short SFT (its own fingerprint).
    cache = tmp_path_factory.mktemp("tool_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLFLOW_CACHE", str(cache))
        path = tool_model.ensure_tool_model(sft_steps=SHORT_SFT_STEPS)
    assert path.startswith(str(cache))
    return path


@pytest.fixture(scope="module")
def tokenizer(tool_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tool_model_dir)


# --------------------------------------------------------------------------- model asset


def test_asset_builds_loads_and_is_cached(tool_model_dir, tokenizer, monkeypatch):
    from transformers import AutoModelForCausalLM

    folder = Path(tool_model_dir)
    spec = tool_model.tool_model_spec(SHORT_SFT_STEPS)
    assert folder.name == f"tiny-tool-lm-{assets._fingerprint(spec)}"
    model = AutoModelForCausalLM.from_pretrained(folder)
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert cfg.vocab_size == len(tokenizer) == 27
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.max_position_embeddings) == (64, 2, 128)
    assert cfg.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|end|>")
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id

    # A second resolve finds the folder and builds nothing.
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setenv("RLFLOW_CACHE", str(folder.parent.parent.parent))
    monkeypatch.setattr(tool_model, "build_tool_model", lambda *a, **k: pytest.fail("rebuilt"))
    assert tool_model.ensure_tool_model(sft_steps=SHORT_SFT_STEPS) == tool_model_dir
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


def test_resolve_demo_path_builds_the_tool_model(private_cache, monkeypatch):
    # The default step count is read at call time, so the demo path can be built short here.
    monkeypatch.setattr(tool_model, "SFT_STEPS", 2)
    path = assets.resolve_demo_path("demo:tiny-tool-lm")
    fingerprint = assets._fingerprint(tool_model.tool_model_spec(2))
    assert path == str(private_cache / "demo" / "v1" / f"tiny-tool-lm-{fingerprint}")
    assert (Path(path) / "model.safetensors").is_file()
    with pytest.raises(assets.DemoAssetError) as info:
        assets.resolve_demo_path("demo:nothing")
    for valid in ("demo:tiny-tool-lm", "demo:calculator/train.parquet", "demo:tiny-char-lm"):
        assert valid in str(info.value)


def test_fingerprint_covers_the_sft_and_format_constants(monkeypatch):
    base = assets._fingerprint(tool_model.tool_model_spec())
    assert assets._fingerprint(tool_model.tool_model_spec(SHORT_SFT_STEPS)) != base
    assert tool_model.tool_model_spec()["base"] == assets._model_spec()
    for name, value in [
        ("SFT_LR", 1e-3),
        ("SFT_SEED", 1),
        ("SFT_BATCH_SIZE", 32),
        ("TOOL_CALL_PROBABILITY", 0.7),
        ("TOOL_CALL_OPEN", "<call>"),
        ("TOOL_CHAT_TEMPLATE", "x"),
        ("MAX_OPERAND", 50),
    ]:
        with monkeypatch.context() as mp:
            mp.setattr(tool_model, name, value)
            assert assets._fingerprint(tool_model.tool_model_spec()) != base, name


def test_sft_is_seeded_and_leaves_caller_state_alone():
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    first, _ = tool_model.build_tool_model(sft_steps=3)
    after_build = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after_build, torch.rand(3))
    assert torch.get_num_threads() == threads
    second, _ = tool_model.build_tool_model(sft_steps=3)
    untrained, _ = tool_model.build_tool_model(sft_steps=0)
    a, b, c = first.state_dict(), second.state_dict(), untrained.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert not first.training


def test_ensure_tool_model_rejects_bad_steps():
    with pytest.raises(ValueError, match="sft_steps"):
        tool_model.ensure_tool_model(sft_steps=-1)


# --------------------------------------------------------------------------- demo model untouched


def test_demo_model_fingerprint_and_tokenizer_are_unchanged():
    # Pinned: the demo model's folder name must not move when tool-model code changes. Update
    # this value only together with a deliberate change to the demo model's constants.
    assert assets._fingerprint(assets._model_spec()) == "480c4083e8"
    assert Path(assets.ensure_demo_model()).name == "tiny-char-lm-480c4083e8"
    demo = assets.build_demo_tokenizer()
    assert demo.convert_ids_to_tokens(list(range(len(demo)))) == DEMO_TOKENS
    assert demo.chat_template == assets.CHAT_TEMPLATE
    assert sorted(demo.all_special_tokens) == sorted(assets.SPECIAL_TOKENS)


# --------------------------------------------------------------------------- tokenizer, template


def test_tool_tokens_are_single_ids_after_the_demo_vocabulary(tokenizer):
    assert tokenizer.convert_ids_to_tokens(list(range(27))) == [
        *DEMO_TOKENS, "<|tool|>", "<tool_call>", "</tool_call>"
    ]
    text = "<tool_call>37+58</tool_call><|end|><|tool|>95<|end|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == [25, 9, 13, 16, 11, 14, 26, 5, 24, 15, 11, 5]
    assert tokenizer.decode(ids) == text
    # The role token is special (dropped); the call tags are not, so a parser still sees them.
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<tool_call>37+58</tool_call>95"
    assert "<|tool|>" in tokenizer.all_special_tokens
    assert "<tool_call>" not in tokenizer.all_special_tokens


def test_chat_template_renders_a_tool_conversation(tokenizer):
    assert tokenizer.chat_template == tool_model.TOOL_CHAT_TEMPLATE
    assert tokenizer.apply_chat_template(TOOL_CONVERSATION, tokenize=False) == TOOL_CONVERSATION_TEXT
    prompt = tokenizer.apply_chat_template(TOOL_CONVERSATION[:3], tokenize=False, add_generation_prompt=True)
    assert prompt == TOOL_CONVERSATION_TEXT.removesuffix("95<|end|>")
    system = [{"role": "system", "content": "0"}, {"role": "user", "content": "1+2="}]
    assert tokenizer.apply_chat_template(system, tokenize=False) == "<|system|>0<|end|><|user|>1+2=<|end|>"
    with pytest.raises(Exception, match="unsupported role ipython"):
        tokenizer.apply_chat_template([{"role": "ipython", "content": "1"}], tokenize=False)


def test_sft_encoding_matches_the_template_and_trains_assistant_tokens_only(tokenizer):
    (ids,), (mask,) = tool_model.encode_conversations(tokenizer, [TOOL_CONVERSATION])
    assert ids == tokenizer(TOOL_CONVERSATION_TEXT, add_special_tokens=False)["input_ids"]
    trained = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert trained == "<tool_call>37+58</tool_call><|end|>95<|end|>"


def test_sft_conversations_follow_the_format():
    rng = random.Random(0)
    conversations = [tool_model.calculator_conversation(37, 58, rng) for _ in range(2000)]
    with_tool = [c for c in conversations if len(c) == 4]
    assert all(c == TOOL_CONVERSATION for c in with_tool)
    assert 0.45 < len(with_tool) / len(conversations) < 0.55
    for conversation in conversations:
        if len(conversation) == 2:
            user, answer = conversation
            assert user == {"role": "user", "content": "37+58="} and answer["role"] == "assistant"
            assert 20 <= int(answer["content"]) <= 198


# --------------------------------------------------------------------------- calculator data


def test_calculator_demo_data_layout(private_cache):
    folder = assets.resolve_demo_path("demo:calculator")
    assert folder.startswith(str(private_cache)) and Path(folder).name.startswith("calculator-")
    assert assets.resolve_demo_path("demo:calculator/train.parquet") == str(Path(folder) / "train.parquet")
    train = pq.read_table(Path(folder) / "train.parquet").to_pylist()
    test = pq.read_table(assets.resolve_demo_path("demo:calculator/test.parquet")).to_pylist()
    assert (len(train), len(test)) == (2048, 256)
    for split, rows in (("train", train), ("test", test)):
        for i, row in enumerate(rows):
            assert set(row) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
            assert row["data_source"] == "arithmetic"
            (message,) = row["prompt"]
            assert message["role"] == "user" and message["content"].endswith("=")
            expression = message["content"][:-1]
            a, b = (int(x) for x in expression.split("+"))
            assert 10 <= a <= 99 and 10 <= b <= 99
            assert row["reward_model"]["ground_truth"] == str(a + b)
            assert compute_score(str(a + b), row["reward_model"]["ground_truth"]) == 1.0
            assert row["extra_info"] == {"split": split, "index": i, "expression": expression}
    test_prompts = [r["prompt"][0]["content"] for r in test]
    assert len(set(test_prompts)) == len(test_prompts)
    assert not set(test_prompts) & {r["prompt"][0]["content"] for r in train}


def test_calculator_splits_are_seeded_and_checked(tmp_path):
    assert calculator.make_splits(30, 10, seed=1) == calculator.make_splits(30, 10, seed=1)
    assert calculator.make_splits(30, 10, seed=1) != calculator.make_splits(30, 10, seed=2)
    # 4 expressions: 3 go to test, train draws from the one left.
    small = calculator.make_splits(5, 3, seed=0, min_operand=1, max_operand=2)
    assert len({r["extra_info"]["expression"] for r in small["train"]}) == 1
    with pytest.raises(ValueError, match="test_size"):
        calculator.make_splits(5, 4, seed=0, min_operand=1, max_operand=2)
    with pytest.raises(ValueError, match="max_operand"):
        calculator.make_splits(5, 1, seed=0, min_operand=5, max_operand=2)
    paths = calculator.main(["--local_dir", str(tmp_path), "--train_size", "7", "--test_size", "3"])
    assert pq.read_metadata(paths["train"]).num_rows == 7 and pq.read_metadata(paths["test"]).num_rows == 3
