"""PreferenceDataset: prompt/answer formats, exact token ids, the truncation policy, collate layout, errors."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rlflow.data.batched_data_dict import BatchedDataDict
from rlflow.data.preference_dataset import PreferenceDataset, collate_preference, truncate_pair
from rlflow.demo.assets import build_demo_tokenizer

PAD, SYSTEM, USER, ASSISTANT, EOS = 0, 2, 3, 4, 5


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLFLOW_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tokenizer():
    return build_demo_tokenizer()


def ids_of(text: str) -> list[int]:
    # Demo vocabulary: 6 special tokens, then these characters in order.
    return [6 + "0123456789+-*=() .".index(c) for c in text]


def chat_prompt_ids(content: str) -> list[int]:
    """ "<|user|>content<|end|><|assistant|>" by hand."""
    return [USER, *ids_of(content), EOS, ASSISTANT]


def user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


def write_parquet(path, rows) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def dataset(tmp_path, tokenizer, rows, *, jsonl=True, **kwargs) -> PreferenceDataset:
    # jsonl keeps each row's own shape (parquet needs one type per column).
    kwargs.setdefault("max_length", 32)
    kwargs.setdefault("max_prompt_length", 16)
    path = write_jsonl(tmp_path / "p.jsonl", rows) if jsonl else write_parquet(tmp_path / "p.parquet", rows)
    return PreferenceDataset(path, tokenizer, **kwargs)


# --------------------------------------------------------------------------- formats and exact ids


def test_chat_prompt_and_string_answers(tmp_path, tokenizer):
    ds = dataset(
        tmp_path, tokenizer, [{"prompt": user("1+2="), "chosen": "3", "rejected": "42"}], jsonl=False
    )
    item = ds[0]
    prompt = chat_prompt_ids("1+2=")
    assert prompt == [3, 7, 16, 8, 19, 5, 4]
    assert item["chosen_input_ids"].tolist() == prompt + [9, EOS]
    assert item["rejected_input_ids"].tolist() == prompt + [10, 8, EOS]
    assert item["chosen_loss_mask"].tolist() == [0] * 7 + [1, 1]
    assert item["rejected_loss_mask"].tolist() == [0] * 7 + [1, 1, 1]
    assert item["chosen_attention_mask"].tolist() == [1] * 9
    assert item["rejected_attention_mask"].tolist() == [1] * 10
    assert item["prompt_length"] == 7 and item["index"] == 0
    assert item["chosen_input_ids"].dtype == torch.long


def test_answer_formats_give_the_same_tokens(tmp_path, tokenizer):
    prompt = [{"role": "system", "content": "0"}, *user("2*3=")]
    rows = [
        {"prompt": prompt, "chosen": "6", "rejected": "5"},
        {"prompt": prompt, "chosen": assistant("6"), "rejected": [assistant("5")]},
        {"prompt": prompt, "chosen": [*prompt, assistant("6")], "rejected": [*prompt, assistant("5")]},
    ]
    ds = dataset(tmp_path, tokenizer, rows)
    expected_prompt = [SYSTEM, *ids_of("0"), EOS, *chat_prompt_ids("2*3=")]
    for i in range(3):
        item = ds[i]
        assert item["chosen_input_ids"].tolist() == expected_prompt + ids_of("6") + [EOS]
        assert item["rejected_input_ids"].tolist() == expected_prompt + ids_of("5") + [EOS]
        assert item["prompt_length"] == len(expected_prompt)


def test_string_prompt_is_used_verbatim(tmp_path, tokenizer):
    ds = dataset(tmp_path, tokenizer, [{"prompt": "1+2=", "chosen": assistant("3"), "rejected": "4"}])
    item = ds[0]
    assert item["chosen_input_ids"].tolist() == ids_of("1+2=") + ids_of("3") + [EOS]
    assert item["rejected_input_ids"].tolist() == ids_of("1+2=") + ids_of("4") + [EOS]
    assert item["prompt_length"] == 4


def test_prompt_and_answer_are_tokenised_separately(tmp_path, tokenizer):
    # A special token's text split across the boundary must not merge into one token.
    ds = dataset(tmp_path, tokenizer, [{"prompt": "1<|en", "chosen": "d|>", "rejected": "2"}])
    ids = ds[0]["chosen_input_ids"].tolist()
    assert EOS not in ids[:-1]  # only the appended EOS
    assert ds[0]["prompt_length"] == len(tokenizer("1<|en", add_special_tokens=False)["input_ids"])


def test_several_files_concatenate(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "1", "chosen": "2", "rejected": "3"}])
    b = write_parquet(tmp_path / "b.parquet", [{"q": user("4"), "good": "5", "bad": "6"}] * 2)
    with pytest.raises(ValueError, match="a.jsonl.*no column 'q'.*prompt_key"):
        PreferenceDataset(
            [b, a],
            tokenizer,
            prompt_key="q",
            chosen_key="good",
            rejected_key="bad",
            max_length=9,
            max_prompt_length=4,
        )
    ds = PreferenceDataset(
        [b, b],
        tokenizer,
        prompt_key="q",
        chosen_key="good",
        rejected_key="bad",
        max_length=9,
        max_prompt_length=4,
    )
    assert len(ds) == 4 and [ds[i]["index"] for i in range(4)] == [0, 1, 2, 3]
    assert ds[3]["chosen_input_ids"].tolist() == chat_prompt_ids("4") + ids_of("5") + [EOS]


# --------------------------------------------------------------------------- truncation policy


def test_truncation_cuts_the_prompt_from_the_left_then_the_answers(tmp_path, tokenizer):
    row = {"prompt": user("123456789="), "chosen": "12345", "rejected": "1"}
    full_prompt = chat_prompt_ids("123456789=")  # 13 tokens
    assert len(full_prompt) == 13
    ds = dataset(tmp_path, tokenizer, [row], max_length=12, max_prompt_length=8)
    item = ds[0]
    prompt = full_prompt[-8:]
    # 8 prompt tokens leave 4 for each answer: the chosen loses "5" and its EOS.
    assert item["chosen_input_ids"].tolist() == prompt + ids_of("1234")
    assert item["rejected_input_ids"].tolist() == prompt + ids_of("1") + [EOS]
    assert item["chosen_loss_mask"].tolist() == [0] * 8 + [1] * 4
    assert item["rejected_loss_mask"].tolist() == [0] * 8 + [1] * 2
    assert item["prompt_length"] == 8


def test_right_prompt_truncation_keeps_the_start(tmp_path, tokenizer):
    row = {"prompt": user("123456789="), "chosen": "12345", "rejected": "1"}
    ds = dataset(tmp_path, tokenizer, [row], max_length=12, max_prompt_length=8, prompt_truncation="right")
    assert ds[0]["chosen_input_ids"].tolist() == chat_prompt_ids("123456789=")[:8] + ids_of("1234")


def test_short_prompt_is_kept_and_only_the_answer_is_cut(tmp_path, tokenizer):
    row = {"prompt": user("1="), "chosen": "123456", "rejected": "9"}  # prompt: 5 tokens
    ds = dataset(tmp_path, tokenizer, [row], max_length=8, max_prompt_length=6)
    item = ds[0]
    assert item["chosen_input_ids"].tolist() == chat_prompt_ids("1=") + ids_of("123")
    assert item["rejected_input_ids"].tolist() == chat_prompt_ids("1=") + ids_of("9") + [EOS]
    assert item["prompt_length"] == 5


def test_long_prompt_is_kept_when_the_pair_fits(tmp_path, tokenizer):
    row = {"prompt": user("123456789="), "chosen": "1", "rejected": "2"}  # 13 + 2 = 15 tokens
    ds = dataset(tmp_path, tokenizer, [row], max_length=15, max_prompt_length=4)
    assert ds[0]["prompt_length"] == 13
    assert ds[0]["chosen_input_ids"].tolist() == chat_prompt_ids("123456789=") + ids_of("1") + [EOS]


def test_truncate_pair_against_a_direct_statement_of_the_policy():
    import random

    rng = random.Random(0)
    for _ in range(300):
        p = list(range(100, 100 + rng.randint(0, 12)))
        c = list(range(200, 200 + rng.randint(1, 12)))
        r = list(range(300, 300 + rng.randint(1, 12)))
        max_length = rng.randint(2, 20)
        max_prompt = rng.randint(1, max_length - 1)
        side = rng.choice(["left", "right"])
        tp, tc, tr = truncate_pair(p, c, r, max_length, max_prompt, side)
        if len(p) + max(len(c), len(r)) <= max_length:
            assert (tp, tc, tr) == (p, c, r)
            continue
        assert len(tp) == min(len(p), max_prompt)
        assert tp == (p[len(p) - len(tp) :] if side == "left" else p[: len(tp)])
        for full, cut in ((c, tc), (r, tr)):
            assert cut == full[: max_length - len(tp)]
            assert len(tp) + len(cut) <= max_length and len(cut) >= 1


# --------------------------------------------------------------------------- collate


def test_collate_interleaves_chosen_and_rejected(tmp_path, tokenizer):
    rows = [
        {"prompt": user("1="), "chosen": "1", "rejected": "22"},
        {"prompt": user("33="), "chosen": "333", "rejected": "4"},
    ]
    ds = dataset(tmp_path, tokenizer, rows)
    items = [ds[0], ds[1]]
    batch = ds.collate(items)
    assert isinstance(batch, BatchedDataDict) and batch.size == 4
    sequences = [
        items[0]["chosen_input_ids"],
        items[0]["rejected_input_ids"],
        items[1]["chosen_input_ids"],
        items[1]["rejected_input_ids"],
    ]
    masks = [
        items[0]["chosen_loss_mask"],
        items[0]["rejected_loss_mask"],
        items[1]["chosen_loss_mask"],
        items[1]["rejected_loss_mask"],
    ]
    width = max(len(s) for s in sequences)
    assert batch["input_ids"].shape == (4, width) == (4, 10)  # 6-token prompt + "333" + EOS
    for r, (seq, mask) in enumerate(zip(sequences, masks, strict=True)):
        n = len(seq)
        assert batch["input_ids"][r].tolist() == seq.tolist() + [PAD] * (width - n)
        assert batch["loss_mask"][r].tolist() == mask.tolist() + [0] * (width - n)
        assert batch["attention_mask"][r].tolist() == [1] * n + [0] * (width - n)
        assert batch["position_ids"][r, :n].tolist() == list(range(n))
    assert batch["input_lengths"].tolist() == [len(s) for s in sequences]
    assert batch["prompt_lengths"].tolist() == [5, 5, 6, 6]
    assert batch["is_chosen"].tolist() == [True, False, True, False]
    assert batch["index"] == [0, 0, 1, 1]

    # A DPO-style per-sequence sum over loss_mask recovers each answer's own tokens.
    torch.manual_seed(0)
    token_logps = torch.randn(4, width - 1)
    summed = (token_logps * batch["loss_mask"][:, 1:]).sum(-1).view(2, 2)
    for k, item in enumerate(items):
        for side, col in (("chosen", 0), ("rejected", 1)):
            start = item["prompt_length"]  # the first answer token is predicted at start - 1
            n_answer = len(item[f"{side}_input_ids"]) - start
            row = 2 * k + col
            assert torch.isclose(summed[k, col], token_logps[row, start - 1 : start - 1 + n_answer].sum())

    padded = collate_preference(items, pad_token_id=PAD, pad_to_multiple_of=8)
    assert padded["input_ids"].shape == (4, 16)
    with pytest.raises(ValueError, match="empty"):
        collate_preference([], PAD)
    with pytest.raises(ValueError, match=r"item 0 has no 'chosen_input_ids'"):
        collate_preference([{"input_ids": torch.ones(2)}], PAD)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "missing, setting", [("prompt", "prompt_key"), ("chosen", "chosen_key"), ("rejected", "rejected_key")]
)
def test_missing_column(tmp_path, tokenizer, missing, setting):
    row = {"prompt": "1", "chosen": "2", "rejected": "3"}
    del row[missing]
    for jsonl in (True, False):
        with pytest.raises(ValueError, match=rf"no column '{missing}'.*set {setting}") as info:
            dataset(tmp_path, tokenizer, [row], jsonl=jsonl)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "chosen",
    ["", "   ", assistant(""), [*user("1="), assistant("")]],
)
def test_empty_answer(tmp_path, tokenizer, chosen):
    with pytest.raises(ValueError, match=r"row 0 of .*p.jsonl.*'chosen' has an empty answer"):
        dataset(tmp_path, tokenizer, [{"prompt": user("1="), "chosen": chosen, "rejected": "2"}])


@pytest.mark.parametrize(
    "prompt, rejected, message",
    [
        (user("1="), [*user("1="), {"role": "user", "content": "2"}], "ending with a 'user' message"),
        (user("1="), [*user("2="), assistant("2")], "differ from the prompt"),
        ("1=", [*user("1="), assistant("2")], "differ from the prompt"),
        (user("1="), {"role": "user", "content": "2"}, "must be an assistant message"),
        (user("1="), 7, "must be a string, an assistant message or a conversation"),
        (7, "2", "column 'prompt' must be a string or a non-empty list"),
        ([], "2", "column 'prompt' must be a string or a non-empty list"),
    ],
)
def test_malformed_rows(tmp_path, tokenizer, prompt, rejected, message):
    with pytest.raises(ValueError, match=message):
        dataset(tmp_path, tokenizer, [{"prompt": prompt, "chosen": "1", "rejected": rejected}])


def test_bad_arguments(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1", "chosen": "2", "rejected": "3"}])
    with pytest.raises(ValueError, match="max_prompt_length=8 must be smaller than max_length=8"):
        PreferenceDataset(path, tokenizer, max_length=8, max_prompt_length=8)
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        PreferenceDataset(path, tokenizer, max_length=0, max_prompt_length=1)
    with pytest.raises(ValueError, match="prompt_truncation='middle'"):
        PreferenceDataset(path, tokenizer, max_length=8, max_prompt_length=4, prompt_truncation="middle")
    with pytest.raises(ValueError, match="must differ"):
        PreferenceDataset(path, tokenizer, max_length=8, max_prompt_length=4, chosen_key="prompt")
    tok = build_demo_tokenizer()
    tok.eos_token = None
    with pytest.raises(ValueError, match="eos_token"):
        PreferenceDataset(path, tok, max_length=8, max_prompt_length=4)
    empty = write_jsonl(tmp_path / "e.jsonl", [])
    with pytest.raises(ValueError, match="no rows"):
        PreferenceDataset(empty, tokenizer, max_length=8, max_prompt_length=4)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        PreferenceDataset(str(tmp_path / "nope.jsonl"), tokenizer, max_length=8, max_prompt_length=4)
