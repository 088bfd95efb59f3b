"""DataPacker hooks, ChatDataPacker == RLHFDataset, and loading user code from .py files."""

from __future__ import annotations

import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rlflow.data.batched_data_dict import BatchedDataDict
from rlflow.data.custom_loading import build_custom_dataset, load_object, resolve_packer
from rlflow.data.packer import ChatDataPacker, DataPacker
from rlflow.data.rlhf_dataset import RLHFDataset, collate_fn
from rlflow.demo.assets import build_demo_tokenizer

PAD, USER, ASSISTANT, EOS = 0, 3, 4, 5


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLFLOW_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tokenizer():
    return build_demo_tokenizer()


def ids_of(text: str) -> list[int]:
    return [6 + "0123456789+-*=() .".index(c) for c in text]


def row(content: str, i: int = 0) -> dict:
    return {
        "data_source": "arithmetic",
        "prompt": [{"role": "user", "content": content}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": str(i)},
        "extra_info": {"split": "train", "index": i},
    }


def write_module(tmp_path, name: str, source: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return str(path)


# --------------------------------------------------------------------------- ChatDataPacker


@pytest.mark.parametrize("truncation, filter_overlong", [("error", True), ("left", False), ("middle", False)])
def test_chat_packer_rollout_batch_equals_rlhf_dataset(tmp_path, tokenizer, truncation, filter_overlong):
    contents = ["1=", "12+34=", "1234567890=", "5*6="]
    rows = [row(c, i) for i, c in enumerate(contents)]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    ds = RLHFDataset(
        str(path),
        tokenizer,
        max_prompt_length=10,
        truncation=truncation,
        filter_overlong_prompts=filter_overlong,
        return_raw_chat=True,
    )
    packer = ChatDataPacker(tokenizer, max_prompt_length=10, truncation=truncation)
    kept_rows = [rows[ds[j]["index"]] for j in range(len(ds))]
    expected = collate_fn([ds[j] for j in range(len(ds))])
    got = packer.rollout_collate_fn([packer.get_rollout_input(r) for r in kept_rows])
    assert isinstance(got, BatchedDataDict)
    for key in ("input_ids", "attention_mask", "position_ids"):
        assert torch.equal(got[key], expected[key]), key
    for key in ("raw_prompt_ids", "raw_prompt", "data_source", "reward_model", "extra_info", "tools_kwargs"):
        assert got[key] == expected[key], key


def test_chat_packer_reads_settings_from_config_and_arguments_win(tokenizer):
    config = {"data": {"prompt_key": "question", "max_prompt_length": 6, "truncation": "right"}}
    packer = resolve_packer(ChatDataPacker, config=config, tokenizer=tokenizer)
    item = packer.get_rollout_input({"question": [{"role": "user", "content": "123456"}]})
    assert item["raw_prompt_ids"] == [USER, *ids_of("12345")]
    assert packer.rollout_collate_fn([item])["input_ids"].shape == (1, 6)

    explicit = ChatDataPacker(tokenizer, max_prompt_length=9)  # set up without a config first
    explicit.setup(config, tokenizer)
    assert (explicit.max_prompt_length, explicit.prompt_key, explicit.truncation) == (9, "question", "right")


def test_chat_packer_policy_batch_has_the_rollout_layout(tokenizer):
    packer = ChatDataPacker(tokenizer, max_prompt_length=8, max_response_length=4)
    rows = [row("1+2="), row("9=")]
    # The completions as a backend decodes them without skipping special tokens.
    completions = ["3<|end|>", "12345"]
    batch = packer.policy_collate_fn([packer.get_policy_input(r, c) for r, c in zip(rows, completions, strict=True)])
    prompt0 = [USER, *ids_of("1+2="), EOS, ASSISTANT]  # 7 tokens
    prompt1 = [USER, *ids_of("9="), EOS, ASSISTANT]  # 5 tokens
    assert batch["prompts"].tolist() == [[PAD] + prompt0, [PAD] * 3 + prompt1]
    assert batch["responses"].tolist() == [[*ids_of("3"), EOS, PAD, PAD], ids_of("1234")]
    assert batch["response_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["input_ids"].tolist() == [
        [PAD] + prompt0 + [*ids_of("3"), EOS, PAD, PAD],
        [PAD] * 3 + prompt1 + ids_of("1234"),
    ]
    assert batch["attention_mask"].tolist() == [[0] + [1] * 9 + [0, 0], [0] * 3 + [1] * 9]
    assert batch["position_ids"].tolist() == [
        [0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 8, 8],
        [0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8],
    ]


def test_chat_packer_errors(tokenizer):
    with pytest.raises(RuntimeError, match="not set up"):
        ChatDataPacker().get_rollout_input(row("1="))
    packer = ChatDataPacker(tokenizer, max_prompt_length=8)
    with pytest.raises(ValueError, match=r"row has no 'prompt' key.*data.prompt_key"):
        packer.get_rollout_input({"question": []})
    with pytest.raises(ValueError, match=r"row\['prompt'\] must be a non-empty list"):
        packer.get_rollout_input({"prompt": "1="})
    with pytest.raises(ValueError, match="exceeds max_length"):
        packer.get_rollout_input(row("1234567890="))
    with pytest.raises(TypeError, match="completion must be the generated text"):
        packer.get_policy_input(row("1="), [1, 2])
    with pytest.raises(ValueError, match="truncation='both'"):
        ChatDataPacker(tokenizer, truncation="both")
    with pytest.raises(ValueError, match="max_prompt_length must be a positive int"):
        ChatDataPacker(tokenizer, max_prompt_length=0)


def test_base_packer_methods_must_be_overridden():
    packer = DataPacker()
    with pytest.raises(NotImplementedError, match="get_rollout_input"):
        packer.get_rollout_input({})
    with pytest.raises(NotImplementedError, match="policy_collate_fn"):
        packer.policy_collate_fn([])


# --------------------------------------------------------------------------- load_object


def test_load_object_by_path(tmp_path):
    path = write_module(
        tmp_path,
        "user_code.py",
        """
        from dataclasses import dataclass

        @dataclass
        class Point:
            x: int

        def double(v):
            return 2 * v
    """,
    )
    assert load_object(path, "double")(21) == 42
    point_cls = load_object(path, "Point")
    assert point_cls(3).x == 3
    # The same unchanged file loads once: the class object is shared.
    assert load_object(path, "Point") is point_cls


def test_load_object_errors(tmp_path):
    path = write_module(tmp_path, "m.py", "def f():\n    return 1\n")
    with pytest.raises(ValueError, match=r"custom code file .*missing.py' not found") as info:
        load_object(str(tmp_path / "missing.py"), "f")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"'g' is not defined in .*m.py.*\['f'\]"):
        load_object(path, "g")
    other = tmp_path / "m.txt"
    other.write_text("x = 1")
    with pytest.raises(ValueError, match="not a .py file"):
        load_object(str(other), "x")
    broken = write_module(tmp_path, "broken.py", "raise RuntimeError('boom')\n")
    with pytest.raises(ValueError, match=r"importing custom code file .*broken.py.*RuntimeError: boom"):
        load_object(broken, "f")
    with pytest.raises(ValueError, match="identifier"):
        load_object(path, "not a name")


def test_loaded_objects_pickle_by_value_for_ray(tmp_path):
    from ray import cloudpickle

    path = write_module(tmp_path, "shipped.py", "def triple(v):\n    return 3 * v\n")
    fn = load_object(path, "triple")
    payload = cloudpickle.dumps(fn)
    # A Ray worker on another node has neither the file nor the module.
    module_name = fn.__module__
    saved = sys.modules.pop(module_name)
    (tmp_path / "shipped.py").unlink()
    try:
        assert cloudpickle.loads(payload)(5) == 15
    finally:
        sys.modules[module_name] = saved


# --------------------------------------------------------------------------- custom datasets


DATASET_SOURCE = """
    from torch.utils.data import Dataset

    class LinesDataset(Dataset):
        def __init__(self, data_files, tokenizer):
            self.rows = []
            for path in data_files:
                with open(path) as f:
                    self.rows += [line.strip() for line in f if line.strip()]
            self.tokenizer = tokenizer
            self.setup_args = None

        def setup(self, config, tokenizer):
            self.setup_args = (config, tokenizer)

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            content = self.rows[i]
            return {"prompt": [{"role": "user", "content": content}], "data_source": "arithmetic"}

    class OnlyConfig:
        def __init__(self, config):
            self.config = config

        def __len__(self):
            return 1

        def __getitem__(self, i):
            return self.config

    class Anything:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def __len__(self):
            return 0

        def __getitem__(self, i):
            raise IndexError(i)

    class NotMapStyle:
        def __iter__(self):
            yield 1

    NOT_A_CLASS = 3
"""


def test_build_custom_dataset_passes_declared_arguments_and_calls_setup(tmp_path, tokenizer):
    data = tmp_path / "lines.txt"
    data.write_text("1+1=\n2+2=\n")
    path = write_module(tmp_path, "my_data.py", DATASET_SOURCE)
    config = {"max_prompt_length": 8}
    ds = build_custom_dataset(path, "LinesDataset", config, tokenizer, [str(data)])
    assert len(ds) == 2 and ds.tokenizer is tokenizer
    assert ds.setup_args == (config, tokenizer)
    # Its rows go through the default packer like RLHFDataset rows.
    packer = resolve_packer(None, config={"data": config}, tokenizer=tokenizer)
    batch = packer.rollout_collate_fn([packer.get_rollout_input(ds[i]) for i in range(2)])
    assert batch["raw_prompt_ids"] == [
        [USER, *ids_of("1+1="), EOS, ASSISTANT],
        [USER, *ids_of("2+2="), EOS, ASSISTANT],
    ]

    assert build_custom_dataset(path, "OnlyConfig", config, tokenizer, ["x"]).config is config
    anything = build_custom_dataset(path, "Anything", config, tokenizer, ["x"])
    assert anything.kwargs == {"data_files": ["x"], "tokenizer": tokenizer, "config": config}


def test_build_custom_dataset_errors(tmp_path, tokenizer):
    path = write_module(tmp_path, "my_data.py", DATASET_SOURCE)
    with pytest.raises(ValueError, match="must define __len__ and __getitem__"):
        build_custom_dataset(path, "NotMapStyle", {}, tokenizer, [])
    with pytest.raises(ValueError, match="it must be a class"):
        build_custom_dataset(path, "NOT_A_CLASS", {}, tokenizer, [])
    with pytest.raises(ValueError, match="'Missing' is not defined"):
        build_custom_dataset(path, "Missing", {}, tokenizer, [])


# --------------------------------------------------------------------------- resolve_packer


PACKER_SOURCE = """
    from rlflow.data.batched_data_dict import BatchedDataDict
    from rlflow.data.packer import DataPacker

    class QuestionPacker(DataPacker):
        def get_rollout_input(self, row):
            return {"messages": [{"role": "user", "content": row["question"]}]}

        def rollout_collate_fn(self, items):
            return BatchedDataDict({"messages": [i["messages"] for i in items]})

        def get_policy_input(self, row, completion):
            return {"text": row["question"] + completion}

        def policy_collate_fn(self, items):
            return BatchedDataDict({"text": [i["text"] for i in items]})

    INSTANCE = QuestionPacker()

    class NotAPacker:
        pass
"""


def test_resolve_packer_by_object_class_and_path(tmp_path, tokenizer):
    path = write_module(tmp_path, "my_packer.py", PACKER_SOURCE)
    cls = load_object(path, "QuestionPacker")
    config = {"data": {}}
    for spec in (
        (path, "QuestionPacker"),
        [path, "QuestionPacker"],
        {"path": path, "name": "QuestionPacker"},
        cls,
        cls(),
    ):
        packer = resolve_packer(spec, config=config, tokenizer=tokenizer)
        assert isinstance(packer, cls)
        assert packer.config is config and packer.tokenizer is tokenizer
        batch = packer.rollout_collate_fn([packer.get_rollout_input({"question": "1+1="})])
        assert batch["messages"] == [[{"role": "user", "content": "1+1="}]]
        assert packer.policy_collate_fn([packer.get_policy_input({"question": "1+1="}, "2")])["text"] == [
            "1+1=2"
        ]
    instance = load_object(path, "INSTANCE")
    assert resolve_packer((path, "INSTANCE")) is instance
    default = resolve_packer(None, tokenizer=tokenizer)
    assert type(default) is ChatDataPacker


def test_resolve_packer_errors(tmp_path):
    path = write_module(tmp_path, "my_packer.py", PACKER_SOURCE)
    with pytest.raises(TypeError, match="must be a DataPacker instance or subclass"):
        resolve_packer((path, "NotAPacker"))
    with pytest.raises(TypeError, match="must be a DataPacker instance or subclass"):
        resolve_packer(42)
    with pytest.raises(ValueError, match=r"\(path, name\) pair"):
        resolve_packer((path,))
    with pytest.raises(ValueError, match="exactly the keys 'path' and 'name'"):
        resolve_packer({"path": path, "name": "QuestionPacker", "extra": 1})
    with pytest.raises(ValueError, match="not found"):
        resolve_packer((str(tmp_path / "nope.py"), "QuestionPacker"))
