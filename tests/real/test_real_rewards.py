"""The GSM8K and MATH scorers on real reference solutions and on real model outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from rlflow.rewards import gsm8k
from rlflow.rewards import math as math_scorer
from rlflow.rewards.registry import default_compute_score

# Greedy answers (200 tokens) of SmolLM2-135M-Instruct to the first 5 GSM8K and MATH test
# prompts of the fetched parts, each with the score a person gave it by reading it: all wrong
# (the model is small), none boxed; two GSM8K answers again against the answer they state.
# Then 12 greedy answers (256 tokens) to the shortest MATH test problems with "Put the final
# answer in \\boxed{}." added: the model never boxed one and none reaches the right answer.
OUTPUTS = Path(__file__).resolve().parents[1] / "fixtures" / "real_model_outputs.json"


@pytest.mark.parametrize("method", ["strict", "flexible"])
def test_gsm8k_reference_solutions_score_one(gsm8k_dir, method):
    for split in ("train", "test"):
        frame = pd.read_parquet(gsm8k_dir / f"{split}.parquet")
        for info, reward in zip(frame.extra_info, frame.reward_model):
            assert gsm8k.compute_score(info["answer"], reward["ground_truth"], method=method) == 1.0, info["answer"][-60:]


def test_math_reference_solutions_score_one(math_dir):
    for split in ("train", "test"):
        frame = pd.read_parquet(math_dir / f"{split}.parquet")
        for info, reward, source in zip(frame.extra_info, frame.reward_model, frame.data_source):
            assert default_compute_score(source, info["solution"], reward["ground_truth"]) == 1.0, info["solution"][-80:]


def test_scorers_on_real_model_outputs():
    cases = json.loads(OUTPUTS.read_text())
    assert {c["data_source"] for c in cases} == {"openai/gsm8k", "math"}
    for case in cases:
        if case["data_source"] == "math":
            got = {"boxed": math_scorer.compute_score(case["response"], case["ground_truth"])}
        else:
            got = {m: gsm8k.compute_score(case["response"], case["ground_truth"], method=m) for m in ("strict", "flexible")}
        assert got == case["expected"], (case["response"][-200:], case["ground_truth"])
