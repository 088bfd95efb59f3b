"""RLHFDataset: parquet prompts -> left-padded tensors, truncation, filtering, errors, collate."""

from __future__ import annotations


import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rlflow.data.batched_data_dict import BatchedDataDict
from rlflow.data.rlhf_dataset import RLHFDataset, collate_fn
from rlflow.demo.assets import build_demo_tokenizer

PAD = 0
USER, END, ASSISTANT = 3, 5, 4


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLFLOW_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tokenizer():
    return build_demo_tokenizer()


def char_id(c: str) -> int:
    # Demo vocabulary: 6 special tokens, then the characters in this order.
    return 6 + "0123456789+-*=() .".index(c)


def expected_prompt_ids(content: str) -> list[int]:
    """ "<|user|>content<|end|><|assistant|>" tokenised by hand."""
    return [USER, *(char_id(c) for c in content), END, ASSISTANT]


def row(content: str, i: int = 0, source: str = "arithmetic") -> dict:
    return {
        "data_source": source,
        "prompt": [{"role": "user", "content": content}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": str(i)},
        "extra_info": {"split": "train", "index": i, "expression": content},
    }


def write(path, rows) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


# --------------------------------------------------------------------------- items


def test_left_padding_and_positions(tmp_path, tokenizer):
    path = write(tmp_path / "d.parquet", [row("1+2=", 0), row("10+20=", 1)])
    ds = RLHFDataset(path, tokenizer, max_prompt_length=12)
    assert len(ds) == 2 and ds.num_dropped == 0
    for i, content in enumerate(["1+2=", "10+20="]):
        ids = expected_prompt_ids(content)
        n = len(ids)
        item = ds[i]
        assert item["input_ids"].dtype == torch.long and item["input_ids"].shape == (12,)
        assert item["input_ids"].tolist() == [PAD] * (12 - n) + ids
        assert item["attention_mask"].tolist() == [0] * (12 - n) + [1] * n
        assert item["position_ids"].tolist() == [0] * (12 - n) + list(range(n))
        assert item["raw_prompt_ids"] == ids
        assert item["index"] == i
        assert item["data_source"] == "arithmetic"
        assert item["reward_model"] == {"style": "rule", "ground_truth": str(i)}
        assert item["extra_info"]["expression"] == content
        assert "raw_prompt" not in item


def test_return_raw_chat(tmp_path, tokenizer):
    messages = [{"role": "system", "content": "0"}, {"role": "user", "content": "1+1="}]
    path = write(tmp_path / "d.parquet", [{**row("x"), "prompt": messages}])
    ds = RLHFDataset(path, tokenizer, max_prompt_length=16, return_raw_chat=True)
    assert ds[0]["raw_prompt"] == messages
    assert ds[0]["raw_prompt_ids"] == [2, char_id("0"), END, *expected_prompt_ids("1+1=")]


@pytest.mark.parametrize("mode", ["left", "right", "middle"])
def test_truncation_modes_apply_to_raw_prompt_ids(tmp_path, tokenizer, mode):
    content = "123+456="
    full = expected_prompt_ids(content)  # 11 tokens
    max_len = 5
    path = write(tmp_path / "d.parquet", [row(content), row("1=", 1)])
    ds = RLHFDataset(
        path, tokenizer, max_prompt_length=max_len, truncation=mode, filter_overlong_prompts=False
    )
    assert ds.num_dropped == 0
    head = max_len // 2  # verl: floor(n/2) head tokens, ceil(n/2) tail tokens
    expected = {
        "left": full[-max_len:],
        "right": full[:max_len],
        "middle": full[:head] + full[len(full) - (max_len - head) :],
    }[mode]
    item = ds[0]
    assert item["input_ids"].tolist() == expected
    assert item["attention_mask"].tolist() == [1] * max_len
    assert item["raw_prompt_ids"] == expected
    # The short prompt is padded, untouched by truncation.
    assert ds[1]["raw_prompt_ids"] == expected_prompt_ids("1=")
    assert ds[1]["input_ids"].tolist() == expected_prompt_ids("1=")


def test_truncation_error_without_filter_fails_at_construction(tmp_path, tokenizer):
    path = write(tmp_path / "d.parquet", [row("1="), row("123+456=", 1)])
    with pytest.raises(ValueError, match=r"row 1 has a 11-token prompt.*max_prompt_length=5"):
        RLHFDataset(path, tokenizer, max_prompt_length=5, filter_overlong_prompts=False)


def test_filtering_counts_and_keeps_original_index(tmp_path, tokenizer):
    contents = ["1=", "1234567=", "2=", "9876543210=", "3+4="]
    path = write(tmp_path / "d.parquet", [row(c, i) for i, c in enumerate(contents)])
    max_len = 7  # "3+4=" renders to exactly 7 tokens and is kept
    ds = RLHFDataset(path, tokenizer, max_prompt_length=max_len)
    kept = [i for i, c in enumerate(contents) if len(expected_prompt_ids(c)) <= max_len]
    assert kept == [0, 2, 4]
    assert ds.num_dropped == 2 and len(ds) == 3
    for j, original in enumerate(kept):
        item = ds[j]
        assert item["index"] == original
        assert item["reward_model"]["ground_truth"] == str(original)
        assert item["raw_prompt_ids"] == expected_prompt_ids(contents[original])
    with pytest.raises(IndexError):
        ds[3]


def test_all_rows_dropped_error(tmp_path, tokenizer):
    path = write(tmp_path / "d.parquet", [row("12345=", i) for i in range(3)])
    with pytest.raises(ValueError, match=r"all 3 rows were dropped.*raise data.max_prompt_length"):
        RLHFDataset(path, tokenizer, max_prompt_length=4)


def test_multiple_files_concatenate_in_order(tmp_path, tokenizer):
    a = write(tmp_path / "a.parquet", [row("1=", 0), row("2=", 1)])
    b = write(tmp_path / "b.parquet", [row("3=", 0, source="math")])
    ds = RLHFDataset([a, b], tokenizer, max_prompt_length=8)
    assert [ds[i]["index"] for i in range(3)] == [0, 1, 2]
    assert [ds[i]["data_source"] for i in range(3)] == ["arithmetic", "arithmetic", "math"]
    assert ds[2]["raw_prompt_ids"] == expected_prompt_ids("3=")


def test_custom_prompt_key_and_optional_columns(tmp_path, tokenizer):
    path = write(tmp_path / "d.parquet", [{"question": [{"role": "user", "content": "5="}]}])
    ds = RLHFDataset(path, tokenizer, prompt_key="question", max_prompt_length=8)
    item = ds[0]
    assert item["raw_prompt_ids"] == expected_prompt_ids("5=")
    assert item["data_source"] is None and item["reward_model"] is None


def test_demo_path_is_resolved(tokenizer):
    ds = RLHFDataset("demo:arithmetic/test.parquet", tokenizer, max_prompt_length=8)
    assert len(ds) == 256 and ds.num_dropped == 0
    assert ds[0]["extra_info"]["split"] == "test"


# --------------------------------------------------------------------------- batched tokenisation


class CountingTokenizer:
    """Forwards to a real tokenizer and counts rendering / tokenising calls."""

    def __init__(self, inner):
        self._inner = inner
        self.template_calls = 0
        self.tokenize_calls = 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def apply_chat_template(self, *args, **kwargs):
        self.template_calls += 1
        return self._inner.apply_chat_template(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        self.tokenize_calls += 1
        return self._inner(*args, **kwargs)


def test_tokenises_in_batches_not_per_row(tmp_path, tokenizer):
    path = write(tmp_path / "d.parquet", [row(f"{i}+{i}=", i) for i in range(50)])
    counting = CountingTokenizer(tokenizer)
    ds = RLHFDataset(path, counting, max_prompt_length=16)
    assert len(ds) == 50
    assert counting.template_calls == 1 and counting.tokenize_calls == 1
    assert ds[37]["raw_prompt_ids"] == expected_prompt_ids("37+37=")


def test_apply_chat_template_kwargs_reach_the_template(tmp_path):
    tok = build_demo_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ suffix }}"
    path = write(tmp_path / "d.parquet", [row("1+1")])
    ds = RLHFDataset(path, tok, max_prompt_length=8, apply_chat_template_kwargs={"suffix": "="})
    assert ds[0]["raw_prompt_ids"] == [char_id(c) for c in "1+1="]


# --------------------------------------------------------------------------- errors


def test_missing_file(tmp_path, tokenizer):
    missing = str(tmp_path / "nope.parquet")
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        RLHFDataset(missing, tokenizer)


def test_unreadable_file(tmp_path, tokenizer):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"this is not parquet")
    with pytest.raises(ValueError, match="bad.parquet") as info:
        RLHFDataset(str(bad), tokenizer)
    assert "\n" not in str(info.value)


def test_missing_prompt_column(tmp_path, tokenizer):
    path = write(tmp_path / "d.parquet", [row("1=")])
    with pytest.raises(ValueError, match=r"no column 'messages'.*data.prompt_key"):
        RLHFDataset(path, tokenizer, prompt_key="messages")


GOOD_PROMPT = [{"role": "user", "content": "1="}]


@pytest.mark.parametrize(
    "prompts, bad_row",
    [
        (["1+1=", "2+2="], 0),  # plain strings, not messages
        ([GOOD_PROMPT, [{"role": "user"}]], 1),  # a message without content
        ([GOOD_PROMPT, []], 1),  # an empty conversation
        ([GOOD_PROMPT, [{"role": None, "content": "1="}]], 1),  # a null role
    ],
)
def test_malformed_prompt_names_the_row(tmp_path, tokenizer, prompts, bad_row):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"p": p} for p in prompts]), path)
    with pytest.raises(ValueError, match=rf"row {bad_row} of .*d.parquet.*column 'p'"):
        RLHFDataset(str(path), tokenizer, prompt_key="p")


def test_tokenizer_without_pad_token(tmp_path):
    tok = build_demo_tokenizer()
    tok.pad_token = None
    path = write(tmp_path / "d.parquet", [row("1=")])
    with pytest.raises(ValueError, match="pad token"):
        RLHFDataset(path, tok)


def test_bad_arguments(tmp_path, tokenizer):
    path = write(tmp_path / "d.parquet", [row("1=")])
    with pytest.raises(ValueError, match="truncation"):
        RLHFDataset(path, tokenizer, truncation="both")
    with pytest.raises(ValueError, match="max_prompt_length"):
        RLHFDataset(path, tokenizer, max_prompt_length=0)
    with pytest.raises(ValueError, match="data_files"):
        RLHFDataset([], tokenizer)
    with pytest.raises(TypeError, match="data_files"):
        RLHFDataset(3, tokenizer)


def test_empty_file(tmp_path, tokenizer):
    schema = pa.schema([("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))])
    path = tmp_path / "empty.parquet"
    pq.write_table(schema.empty_table(), path)
    with pytest.raises(ValueError, match="no rows"):
        RLHFDataset(str(path), tokenizer)


# --------------------------------------------------------------------------- collate


def test_collate_stacks_tensors_and_lists_the_rest(tmp_path, tokenizer):
    contents = ["1=", "22=", "333="]
    path = write(tmp_path / "d.parquet", [row(c, i) for i, c in enumerate(contents)])
    ds = RLHFDataset(path, tokenizer, max_prompt_length=8, return_raw_chat=True)
    items = [ds[i] for i in range(3)]
    batch = collate_fn(items)
    assert isinstance(batch, BatchedDataDict)
    for key in ("input_ids", "attention_mask", "position_ids"):
        assert batch[key].shape == (3, 8)
        assert torch.equal(batch[key], torch.stack([it[key] for it in items]))
    assert batch["raw_prompt_ids"] == [expected_prompt_ids(c) for c in contents]
    assert batch["index"] == [0, 1, 2]
    assert batch["data_source"] == ["arithmetic"] * 3
    assert batch["raw_prompt"] == [[{"role": "user", "content": c}] for c in contents]
    with pytest.raises(ValueError, match="empty"):
        collate_fn([])
    with pytest.raises(ValueError, match="row 1"):
        collate_fn([items[0], {"input_ids": items[1]["input_ids"]}])


# --------------------------------------------------------------------------- jsonl, several files


def write_jsonl(path, rows) -> str:
    import json

    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_jsonl_gives_the_same_items_as_parquet(tmp_path, tokenizer):
    rows = [row(c, i) for i, c in enumerate(["1=", "22+3=", "4*5="])]
    from_parquet = RLHFDataset(write(tmp_path / "d.parquet", rows), tokenizer, max_prompt_length=10)
    from_jsonl = RLHFDataset(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, max_prompt_length=10)
    assert len(from_jsonl) == 3
    for i in range(3):
        a, b = from_parquet[i], from_jsonl[i]
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert torch.equal(a[key], b[key]), key
            else:
                assert a[key] == b[key], key
    assert from_jsonl[1]["raw_prompt_ids"] == expected_prompt_ids("22+3=")


def test_parquet_and_jsonl_files_concatenate(tmp_path, tokenizer):
    a = write(tmp_path / "a.parquet", [row("1=", 0), row("2=", 1)])
    b = write_jsonl(tmp_path / "b.jsonl", [row("3=", 0, source="math"), row("4=", 1, source="math")])
    ds = RLHFDataset([b, a], tokenizer, max_prompt_length=8)
    assert [ds[i]["raw_prompt_ids"] for i in range(4)] == [
        expected_prompt_ids(c) for c in ["3=", "4=", "1=", "2="]
    ]
    assert [ds[i]["index"] for i in range(4)] == [0, 1, 2, 3]
    assert [ds[i]["data_source"] for i in range(4)] == ["math", "math", "arithmetic", "arithmetic"]


def test_jsonl_blank_lines_are_skipped_and_missing_optional_keys_are_none(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"prompt": [{"role": "user", "content": "1="}]}\n'
        "\n"
        '{"prompt": [{"role": "user", "content": "2="}], "data_source": "x"}\n'
    )
    ds = RLHFDataset(str(path), tokenizer, max_prompt_length=8)
    assert len(ds) == 2
    assert ds[0]["data_source"] is None and ds[0]["extra_info"] is None and ds[0]["tools_kwargs"] == {}
    assert ds[1]["data_source"] == "x"


def test_errors_name_the_file_at_fault(tmp_path, tokenizer):
    good = write(tmp_path / "good.parquet", [row("1=")])
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": [{"role": "user", "content": "1="}]}\n{"prompt": [\n')
    with pytest.raises(ValueError, match=r"line 2 of data file .*bad.jsonl.* not valid JSON") as info:
        RLHFDataset([good, str(bad_json)], tokenizer)
    assert "\n" not in str(info.value)

    not_object = tmp_path / "list.jsonl"
    not_object.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"line 1 of data file .*list.jsonl.* JSON list.*one JSON object"):
        RLHFDataset([good, str(not_object)], tokenizer)

    no_prompt = write_jsonl(tmp_path / "np.jsonl", [row("1="), {"question": "2="}])
    with pytest.raises(
        ValueError, match=r"line 2 of data file .*np.jsonl.* no column 'prompt'.*data.prompt_key"
    ):
        RLHFDataset([good, no_prompt], tokenizer)

    other = write(tmp_path / "other.parquet", [{"question": [{"role": "user", "content": "1="}]}])
    with pytest.raises(ValueError, match=r"other.parquet.*no column 'prompt'"):
        RLHFDataset([good, other], tokenizer)

    csv = tmp_path / "d.csv"
    csv.write_text("prompt\n1=\n")
    with pytest.raises(ValueError, match=r"d.csv.*extension '.csv'.*\.parquet and \.jsonl"):
        RLHFDataset([good, str(csv)], tokenizer)

    bad_row = write_jsonl(tmp_path / "rows.jsonl", [row("1="), {"prompt": "2="}])
    with pytest.raises(ValueError, match=r"row 1 of .*rows.jsonl.*column 'prompt'"):
        RLHFDataset([good, bad_row], tokenizer)


def test_unknown_role_is_a_one_line_data_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": [{"role": "tool", "content": "1"}]}])
    with pytest.raises(ValueError, match=r"chat template: unsupported role tool") as info:
        RLHFDataset(path, tokenizer)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- max_samples, extra outputs


def test_max_samples_keeps_the_first_rows_after_filtering(tmp_path, tokenizer):
    contents = ["1=", "1234567890=", "2=", "3=", "4="]
    path = write(tmp_path / "d.parquet", [row(c, i) for i, c in enumerate(contents)])
    ds = RLHFDataset(path, tokenizer, max_prompt_length=6, max_samples=3)
    assert len(ds) == 3
    assert [ds[i]["index"] for i in range(3)] == [0, 2, 3]
    assert ds.num_dropped == 1
    assert len(RLHFDataset(path, tokenizer, max_prompt_length=6, max_samples=-1)) == 4
    assert len(RLHFDataset(path, tokenizer, max_prompt_length=6, max_samples=10)) == 4


def test_max_samples_stops_tokenising_early(tmp_path, tokenizer, monkeypatch):
    import rlflow.data.rlhf_dataset as module

    monkeypatch.setattr(module, "_TOKENIZE_CHUNK", 4)
    path = write(tmp_path / "d.parquet", [row(f"{i}=", i) for i in range(40)])
    counting = CountingTokenizer(tokenizer)
    ds = RLHFDataset(path, counting, max_prompt_length=8, max_samples=6)
    assert [ds[i]["index"] for i in range(6)] == list(range(6))
    assert counting.template_calls == 2  # chunks [0, 4) and [4, 8) only, not all 10


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_max_samples_must_be_minus_one_or_positive(tmp_path, tokenizer, bad):
    path = write(tmp_path / "d.parquet", [row("1=")])
    with pytest.raises(ValueError, match="max_samples"):
        RLHFDataset(path, tokenizer, max_samples=bad)


def test_return_full_prompt_is_the_rendered_text(tmp_path, tokenizer):
    messages = [{"role": "system", "content": "0"}, {"role": "user", "content": "1+1="}]
    path = write(tmp_path / "d.parquet", [{**row("x"), "prompt": messages}, row("12345=", 1)])
    ds = RLHFDataset(
        path,
        tokenizer,
        max_prompt_length=5,
        return_full_prompt=True,
        filter_overlong_prompts=False,
        truncation="left",
    )
    assert ds[0]["full_prompts"] == "<|system|>0<|end|><|user|>1+1=<|end|><|assistant|>"
    # The text is the untruncated rendering, even when the ids are cut.
    assert ds[1]["full_prompts"] == "<|user|>12345=<|end|><|assistant|>"
    assert len(ds[1]["raw_prompt_ids"]) == 5
    assert "full_prompts" not in RLHFDataset(path, tokenizer, max_prompt_length=16)[0]


def test_extra_info_passes_through_with_index_and_tools_kwargs(tmp_path, tokenizer):
    tools = {"calculator": {"create_kwargs": {"ground_truth": "2"}}}
    rows = [
        {**row("1+1=", 0), "extra_info": {"split": "train", "index": 41, "tools_kwargs": tools}},
        {**row("2=", 1), "extra_info": {"split": "train", "index": 42}},
    ]
    for path in (write(tmp_path / "d.parquet", rows), write_jsonl(tmp_path / "d.jsonl", rows)):
        ds = RLHFDataset(path, tokenizer, max_prompt_length=8)
        first, second = ds[0], ds[1]
        assert first["extra_info"]["index"] == 41 and second["extra_info"]["index"] == 42
        assert first["extra_info"]["split"] == "train"
        assert first["tools_kwargs"] == tools
        assert second["tools_kwargs"] == {}
        assert (first["index"], second["index"]) == (0, 1)
        batch = collate_fn([first, second])
        assert batch["tools_kwargs"] == [tools, {}]


# --------------------------------------------------------------------------- parallel tokenisation


class ThreadRecordingTokenizer(CountingTokenizer):
    def __init__(self, inner):
        super().__init__(inner)
        import threading

        self._lock = threading.Lock()
        self.threads: set[int] = set()

    def apply_chat_template(self, *args, **kwargs):
        import threading

        with self._lock:
            self.threads.add(threading.get_ident())
        return super().apply_chat_template(*args, **kwargs)


@pytest.mark.parametrize("filter_overlong", [True, False])
def test_parallel_tokenisation_equals_serial(tmp_path, tokenizer, monkeypatch, filter_overlong):
    import random
    import threading

    import rlflow.data.rlhf_dataset as module

    monkeypatch.setattr(module, "_TOKENIZE_CHUNK", 7)
    rng = random.Random(0)
    contents = ["".join(rng.choice("0123456789+-*=") for _ in range(rng.randint(1, 20))) for _ in range(100)]
    path = write(tmp_path / "d.parquet", [row(c, i) for i, c in enumerate(contents)])
    kwargs = dict(
        max_prompt_length=16,
        filter_overlong_prompts=filter_overlong,
        truncation="middle",
        return_full_prompt=True,
        max_samples=90,
    )
    serial = RLHFDataset(path, tokenizer, **kwargs)
    recording = ThreadRecordingTokenizer(tokenizer)
    parallel = RLHFDataset(path, recording, filter_overlong_prompts_workers=3, **kwargs)
    assert threading.get_ident() not in recording.threads  # chunks ran on pool threads
    assert len(parallel) == len(serial) and parallel.num_dropped == serial.num_dropped
    if filter_overlong:
        assert serial.num_dropped > 0
    for i in range(len(serial)):
        a, b = serial[i], parallel[i]
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert torch.equal(a[key], b[key]), (i, key)
            else:
                assert a[key] == b[key], (i, key)
    # and both equal a direct per-row rendering
    kept = [i for i, c in enumerate(contents) if not filter_overlong or len(expected_prompt_ids(c)) <= 16][
        :90
    ]
    assert [serial[j]["index"] for j in range(len(serial))] == kept


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_workers_must_be_a_positive_int(tmp_path, tokenizer, bad):
    path = write(tmp_path / "d.parquet", [row("1=")])
    with pytest.raises(ValueError, match="filter_overlong_prompts_workers"):
        RLHFDataset(path, tokenizer, filter_overlong_prompts_workers=bad)


def test_error_in_a_pool_chunk_surfaces(tmp_path, tokenizer, monkeypatch):
    import rlflow.data.rlhf_dataset as module

    monkeypatch.setattr(module, "_TOKENIZE_CHUNK", 2)
    rows = [row(f"{i}=", i) for i in range(9)] + [{**row("x", 9), "prompt": []}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(ValueError, match=r"row 9 of .*d.jsonl"):
        RLHFDataset(path, tokenizer, filter_overlong_prompts_workers=2)


# --------------------------------------------------------------------------- the fast-tokenizer shortcut


def test_chat_encoder_shortcut_matches_the_tokenizer_call(tokenizer):
    from rlflow.data.rlhf_dataset import ChatEncoder

    conversations = [
        [{"role": "user", "content": "1+2="}],
        [{"role": "system", "content": "<|end|> 9"}, {"role": "user", "content": "x?"}],  # special + unknown
    ]
    encoder = ChatEncoder(tokenizer)
    texts, ids = encoder(conversations)
    assert encoder._backend is not None  # the demo tokenizer is a fast tokenizer
    assert ids == tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert ids[0] == expected_prompt_ids("1+2=")
    assert ids[1] == [2, END, char_id(" "), char_id("9"), END, USER, 1, 1, END, ASSISTANT]  # x, ? -> <unk>


def test_chat_encoder_falls_back_when_the_backend_truncates(tokenizer):
    from rlflow.data.rlhf_dataset import ChatEncoder

    tok = build_demo_tokenizer()
    tok.backend_tokenizer.enable_truncation(max_length=3)
    encoder = ChatEncoder(tok)
    _, ids = encoder([[{"role": "user", "content": "12345="}]])
    assert encoder._backend is None
    assert ids[0] == expected_prompt_ids("12345=")  # not cut to 3 by the backend's own setting
    assert (
        ids
        == tok(
            [
                tok.apply_chat_template(
                    [{"role": "user", "content": "12345="}], tokenize=False, add_generation_prompt=True
                )
            ],
            add_special_tokens=False,
        )["input_ids"]
    )
