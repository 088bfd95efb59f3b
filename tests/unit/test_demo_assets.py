"""Demo assets (tiny char LM, arithmetic parquet), bundled folders and the arithmetic generator."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import rlflow
from rlflow.demo import assets
from rlflow.utils import bundled

REPO_ROOT = Path(rlflow.__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("RLFLOW_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def demo_model_dir(tmp_path_factory):
    # Built once for the module (a few seconds); the per-test RLFLOW_CACHE is not set yet here.
    cache = tmp_path_factory.mktemp("model_cache")
    old = os.environ.get("RLFLOW_CACHE")
    os.environ["RLFLOW_CACHE"] = str(cache)
    try:
        path = assets.ensure_demo_model()
    finally:
        if old is None:
            del os.environ["RLFLOW_CACHE"]
        else:
            os.environ["RLFLOW_CACHE"] = old
    assert path.startswith(str(cache))
    return path


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model_dir)


# --------------------------------------------------------------------------- cache root


def test_cache_root_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("RLFLOW_CACHE", str(tmp_path / "x"))
    assert assets.cache_root() == tmp_path / "x"
    monkeypatch.delenv("RLFLOW_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.cache_root() == tmp_path / "home" / ".cache" / "rlflow"


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_vocabulary_and_special_ids(tokenizer):
    expected = ["<pad>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"] + list(
        "0123456789+-*=() ."
    )
    assert len(tokenizer) == len(expected) == 24
    assert tokenizer.convert_ids_to_tokens(list(range(24))) == expected
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id == 0
    assert tokenizer.eos_token == "<|end|>" and tokenizer.eos_token_id == 5
    assert tokenizer.unk_token_id == 1


def test_tokenizer_round_trips_characters(tokenizer):
    text = "12+34=46 (7*8)-9. "
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # One id per character, and each id is that character's vocabulary entry.
    assert ids == [tokenizer.convert_tokens_to_ids(c) for c in text]
    assert tokenizer.decode(ids) == text
    # Out-of-vocabulary characters become <unk>, one per character.
    assert tokenizer("a1", add_special_tokens=False)["input_ids"] == [1, tokenizer.convert_tokens_to_ids("1")]


def test_special_tokens_are_single_ids_and_skippable(tokenizer):
    ids = tokenizer("<|user|>3+4=<|end|>", add_special_tokens=False)["input_ids"]
    assert ids == [3, 9, 16, 10, 19, 5]
    assert tokenizer.decode(ids) == "<|user|>3+4=<|end|>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "3+4="


def test_chat_template_renders_roles(tokenizer):
    messages = [{"role": "system", "content": "0"}, {"role": "user", "content": "3+4="}]
    assert (
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        == "<|system|>0<|end|><|user|>3+4=<|end|><|assistant|>"
    )
    with_answer = messages + [{"role": "assistant", "content": "7"}]
    assert (
        tokenizer.apply_chat_template(with_answer, tokenize=False)
        == "<|system|>0<|end|><|user|>3+4=<|end|><|assistant|>7<|end|>"
    )
    # The template is saved with the tokenizer, not only set in memory.
    assert tokenizer.chat_template == assets.CHAT_TEMPLATE


def test_chat_template_rejects_unknown_role(tokenizer):
    with pytest.raises(Exception, match="unsupported role tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "1"}], tokenize=False)


# --------------------------------------------------------------------------- model


def test_model_loads_with_auto_class(demo_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo_model_dir)
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert cfg.vocab_size == len(tokenizer) == 24
    assert (cfg.hidden_size, cfg.intermediate_size) == (64, 256)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads) == (2, 2)
    assert cfg.max_position_embeddings == 128
    assert cfg.eos_token_id == tokenizer.eos_token_id and cfg.pad_token_id == tokenizer.pad_token_id
    assert cfg.bos_token_id is not None
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert next(model.parameters()).dtype == torch.float32
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert (Path(demo_model_dir) / "model.safetensors").is_file()
    ids = torch.tensor([[3, 9, 16, 10, 19, 5, 4]])
    assert model(input_ids=ids).logits.shape == (1, 7, 24)


def test_model_build_is_seeded_and_leaves_global_rng_alone():
    tok = assets.build_demo_tokenizer()
    torch.manual_seed(123)
    first = assets.build_demo_model(tok).state_dict()
    after_build = torch.rand(3)
    torch.manual_seed(123)
    expected_stream = torch.rand(3)
    second = assets.build_demo_model(tok).state_dict()
    assert torch.equal(after_build, expected_stream)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_ensure_demo_model_is_cached(private_cache):
    path = assets.ensure_demo_model()
    assert Path(path).parent.parent.parent == private_cache
    stamp = (Path(path) / "model.safetensors").stat().st_mtime_ns
    assert assets.ensure_demo_model() == path
    assert (Path(path) / "model.safetensors").stat().st_mtime_ns == stamp
    # Nothing but the finished folder is left behind.
    assert [p.name for p in Path(path).parent.iterdir()] == [Path(path).name]


# --------------------------------------------------------------------------- atomic creation


def test_build_atomically_uses_the_winner_of_a_race(tmp_path):
    target = tmp_path / "asset"

    def build(tmp: Path) -> None:
        (tmp / "mine.txt").write_text("loser")
        # Another process finishes first while this one is still building.
        target.mkdir()
        (target / "theirs.txt").write_text("winner")

    assert assets._build_atomically(target, build) == target
    assert sorted(p.name for p in target.iterdir()) == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["asset"]


def test_build_atomically_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "asset"

    def build(tmp: Path) -> None:
        (tmp / "half.txt").write_text("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        assets._build_atomically(target, build)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_cache_names_rlflow_cache(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("RLFLOW_CACHE", str(blocker))
    with pytest.raises(assets.DemoAssetError, match="RLFLOW_CACHE"):
        assets.ensure_demo_data()


# --------------------------------------------------------------------------- resolve


def test_resolve_passes_other_paths_through():
    for path in ("/data/train.parquet", "Qwen/Qwen2.5-0.5B-Instruct", "relative/dir", ""):
        assert assets.resolve_demo_path(path) == path
    assert assets.resolve_demo_path(Path("/x")) == Path("/x")


def test_resolve_unknown_demo_name_lists_valid_ones():
    with pytest.raises(assets.DemoAssetError) as info:
        assets.resolve_demo_path("demo:gpt-5")
    message = str(info.value)
    assert "'demo:gpt-5'" in message
    for valid in ("demo:tiny-char-lm", "demo:arithmetic/train.parquet", "demo:arithmetic/test.parquet"):
        assert valid in message
    with pytest.raises(assets.DemoAssetError):
        assets.resolve_demo_path("demo:arithmetic/val.parquet")
    with pytest.raises(TypeError, match="path"):
        assets.resolve_demo_path(3)


def test_resolve_demo_data(private_cache):
    train = assets.resolve_demo_path("demo:arithmetic/train.parquet")
    test = assets.resolve_demo_path("demo:arithmetic/test.parquet")
    assert train.startswith(str(private_cache)) and train.endswith("train.parquet")
    assert Path(test).parent == Path(train).parent
    assert assets.resolve_demo_path("demo:arithmetic") == str(Path(train).parent)
    assert pq.read_metadata(train).num_rows == 2048
    assert pq.read_metadata(test).num_rows == 256
    assert assets.ensure_demo_data() == {"train": train, "test": test}
    rows = pq.read_table(test).to_pylist()
    assert {r["extra_info"]["split"] for r in rows} == {"test"}


# --------------------------------------------------------------------------- bundled folders


def test_bundled_dir_source_checkout():
    assert bundled.bundled_dir("data_preprocess") == REPO_ROOT / "examples" / "data_preprocess"
    assert bundled.bundled_dir("recipes") == REPO_ROOT / "recipes"


def test_bundled_dir_prefers_wheel_layout(tmp_path, monkeypatch):
    wheel, source = tmp_path / "wheel", tmp_path / "source"
    wheel.mkdir()
    source.mkdir()
    monkeypatch.setitem(bundled._LOCATIONS, "recipes", (wheel, source))
    assert bundled.bundled_dir("recipes") == wheel
    wheel.rmdir()
    assert bundled.bundled_dir("recipes") == source
    source.rmdir()
    with pytest.raises(bundled.BundledAssetError, match="recipes"):
        bundled.bundled_dir("recipes")


def test_bundled_dir_unknown_name():
    with pytest.raises(ValueError, match="'docs'"):
        bundled.bundled_dir("docs")


def test_import_data_preprocess_caches_module():
    module = bundled.import_data_preprocess("arithmetic")
    assert bundled.import_data_preprocess("arithmetic") is module
    assert sys.modules["rlflow._bundled_data_preprocess.arithmetic"] is module
    assert Path(module.__file__) == REPO_ROOT / "examples" / "data_preprocess" / "arithmetic.py"
    with pytest.raises(bundled.BundledAssetError, match="no_such_script"):
        bundled.import_data_preprocess("no_such_script")
    with pytest.raises(ValueError):
        bundled.import_data_preprocess("../arithmetic")


# --------------------------------------------------------------------------- arithmetic generator


@pytest.fixture(scope="module")
def arithmetic():
    return bundled.import_data_preprocess("arithmetic")


def _evaluate(expression: str) -> int:
    # Independent of the generator: find the operator after the first character.
    for pos in range(1, len(expression)):
        if expression[pos] in "+-*":
            a, op, b = int(expression[:pos]), expression[pos], int(expression[pos + 1 :])
            return {"+": a + b, "-": a - b, "*": a * b}[op]
    raise AssertionError(f"no operator in {expression!r}")


def test_rows_have_verl_schema_and_correct_answers(arithmetic):
    rows = arithmetic.make_rows(300, seed=5, split="train")
    assert len(rows) == 300
    pairs = set()
    for i, row in enumerate(rows):
        assert set(row) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
        assert row["data_source"] == "arithmetic" and row["ability"] == "math"
        (message,) = row["prompt"]
        assert message["role"] == "user" and message["content"].endswith("=")
        expression = message["content"][:-1]
        assert row["extra_info"] == {"split": "train", "index": i, "expression": expression}
        a, b = (int(x) for x in expression.split("+"))
        assert 0 <= a <= 4 and 0 <= b <= 4
        assert row["reward_model"] == {"style": "rule", "ground_truth": str(a + b)}
        pairs.add((a, b))
    # 300 uniform draws over 25 pairs cover all of them (miss probability ~ 25 * 0.96^300).
    assert len(pairs) == 25


def test_rows_other_ops(arithmetic):
    rows = arithmetic.make_rows(200, seed=1, ops=("+", "-", "*"), max_operand=9, min_operand=2)
    ops_seen = set()
    for row in rows:
        expression = row["extra_info"]["expression"]
        assert row["reward_model"]["ground_truth"] == str(_evaluate(expression))
        ops_seen.update(c for c in expression[1:] if c in "+-*")
        assert all(2 <= int(x) <= 9 for x in expression.replace("*", "+").replace("-", "+").split("+"))
    assert ops_seen == {"+", "-", "*"}


def test_rows_are_deterministic(arithmetic):
    assert arithmetic.make_rows(50, seed=3) == arithmetic.make_rows(50, seed=3)
    assert arithmetic.make_rows(50, seed=3) != arithmetic.make_rows(50, seed=4)


def test_rows_bad_arguments(arithmetic):
    with pytest.raises(ValueError, match="ops"):
        arithmetic.make_rows(5, seed=0, ops=("/",))
    with pytest.raises(ValueError, match="max_operand"):
        arithmetic.make_rows(5, seed=0, max_operand=-1)
    with pytest.raises(ValueError, match="num_rows"):
        arithmetic.make_rows(-1, seed=0)


def test_write_splits_uses_different_seeds(arithmetic, tmp_path):
    paths = arithmetic.write_splits(tmp_path, train_size=40, test_size=30, seed=7)
    train = pq.read_table(paths["train"]).to_pylist()
    test = pq.read_table(paths["test"]).to_pylist()
    assert len(train) == 40 and len(test) == 30
    assert train == arithmetic.make_rows(40, seed=7, split="train")
    assert test == arithmetic.make_rows(30, seed=7 + arithmetic.TEST_SEED_OFFSET, split="test")
    assert [r["prompt"] for r in test] != [r["prompt"] for r in train[:30]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.parquet", "train.parquet"]


def test_cli_writes_parquet(tmp_path):
    script = REPO_ROOT / "examples" / "data_preprocess" / "arithmetic.py"
    out = tmp_path / "out"
    subprocess.run(
        [sys.executable, str(script), "--local_dir", str(out), "--train_size", "12",
         "--test_size", "5", "--seed", "2", "--max_operand", "3"],
        check=True, capture_output=True, text=True,
    )
    train = pq.read_table(out / "train.parquet").to_pylist()
    assert len(train) == 12 and pq.read_metadata(out / "test.parquet").num_rows == 5
    for row in train:
        a, b = (int(x) for x in row["extra_info"]["expression"].split("+"))
        assert a <= 3 and b <= 3 and row["reward_model"]["ground_truth"] == str(a + b)


def test_concurrent_processes_agree_on_one_folder(private_cache):
    code = "from rlflow.demo.assets import ensure_demo_data; print(ensure_demo_data()['train'])"
    env = {**os.environ, "RLFLOW_CACHE": str(private_cache)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outputs)) == 1
    folder = Path(outputs[0]).parent
    # Losers removed their temporary copies; only the winner's folder remains.
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]
    assert pq.read_metadata(outputs[0]).num_rows == 2048
