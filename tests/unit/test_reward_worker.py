"""RewardWorker in-process: scores on the last response token, failures scored and counted."""

from __future__ import annotations

import time

import pytest
import torch
from omegaconf import OmegaConf

from rlflow.config.compose import compose_config
from rlflow.data.batched_data_dict import BatchedDataDict
from rlflow.errors import RewardError
from rlflow.models.loading import load_tokenizer
from rlflow.rewards.guarded import call_with_timeout, guarded_score
from rlflow.workers.reward import RewardWorker


def make_batch(tokenizer, answers, truths):
    eos = tokenizer.eos_token_id
    rows = [tokenizer(a, add_special_tokens=False).input_ids + [eos] for a in answers]
    width = max(len(r) for r in rows) + 1
    responses = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        responses[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return BatchedDataDict({
        "responses": responses,
        "response_mask": mask,
        "data_source": ["arithmetic"] * len(rows),
        "reward_model": [{"style": "rule", "ground_truth": t} for t in truths],
        "extra_info": [{"index": i} for i in range(len(rows))],
    })


def worker_with(tmp_path, fn_source=None, **reward):
    overrides = [f"reward.{k}={v}" for k, v in reward.items()]
    if fn_source is not None:
        path = tmp_path / "my_reward.py"
        path.write_text(fn_source)
        overrides += [f"reward.custom_fn.path={path}", "reward.custom_fn.name=score"]
    cfg = compose_config("grpo", overrides)
    return RewardWorker(OmegaConf.to_container(cfg)), load_tokenizer(cfg.model)


def test_scores_placed_on_last_valid_token(tmp_path):
    worker, tok = worker_with(tmp_path)
    batch = make_batch(tok, ["7", "12+", "3"], ["7", "12", "4"])
    out = worker.compute_reward(batch)
    assert out["scores"].tolist() == [1.0, 1.0, 0.0]
    lengths = batch["response_mask"].sum(1)
    for i, n in enumerate(lengths.tolist()):
        expected = torch.zeros(batch["responses"].shape[1])
        expected[n - 1] = out["scores"][i]
        assert torch.equal(out["token_level_scores"][i], expected)
    assert out["reward_failed"].sum() == 0 and out["reward_timed_out"].sum() == 0


def test_raising_and_slow_scorers_get_error_score(tmp_path):
    source = (
        "import time\n"
        "def score(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    if solution_str == '1':\n"
        "        raise RuntimeError('boom')\n"
        "    if solution_str == '2':\n"
        "        time.sleep(30)\n"
        "    return {'score': 1.0, 'length': len(solution_str)}\n"
    )
    worker, tok = worker_with(tmp_path, source, timeout_s=0.5, error_score=-1.0)
    batch = make_batch(tok, ["1", "2", "33"], ["0", "0", "0"])
    start = time.monotonic()
    out = worker.compute_reward(batch)
    assert time.monotonic() - start < 10
    assert out["scores"].tolist() == [-1.0, -1.0, 1.0]
    assert out["reward_failed"].tolist() == [1.0, 0.0, 0.0]
    assert out["reward_timed_out"].tolist() == [0.0, 1.0, 0.0]
    assert out["reward_extra/length"].tolist() == [0.0, 0.0, 2.0]


def test_timeout_from_a_thread_without_alarm():
    import threading

    result = {}

    def run():
        result["value"] = guarded_score(lambda: time.sleep(5), {}, 0.2, 0.5)

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    assert result["value"] == (0.5, "timeout")
    assert call_with_timeout(lambda x: x + 1, {"x": 1}, 1.0) == 2


@pytest.mark.parametrize(
    "returned, type_name", [("None", "NoneType"), ("'1.0'", "str"), ("[1.0]", "list"), ("{'acc': 1.0}", "dict")]
)
def test_a_reward_function_returning_a_wrong_type_is_named(tmp_path, returned, type_name):
    source = f"def score(data_source, solution_str, ground_truth, extra_info=None):\n    return {returned}\n"
    worker, tok = worker_with(tmp_path, source)
    with pytest.raises(RewardError) as info:
        worker.compute_reward(make_batch(tok, ["7"], ["7"]))
    message = str(info.value)
    assert "\n" not in message
    assert "'score'" in message and "my_reward.py" in message and type_name in message
    assert "must return a float" in message


def test_null_ground_truth_names_the_row_unless_the_scorer_needs_none(tmp_path):
    worker, tok = worker_with(tmp_path)
    batch = make_batch(tok, ["7", "3"], ["7", None])
    batch["index"] = [10, 11]
    with pytest.raises(RewardError, match=r"data row 11: reward_model.ground_truth is null.*needs_ground_truth"):
        worker.compute_reward(batch)
    source = (
        "def score(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    return float(len(solution_str))\n"
        "score.needs_ground_truth = False\n"
    )
    worker, tok = worker_with(tmp_path, source)
    assert worker.compute_reward(make_batch(tok, ["7", "33"], [None, None]))["scores"].tolist() == [1.0, 2.0]


def test_a_data_source_without_scorer_is_an_error_not_a_zero(tmp_path):
    worker, tok = worker_with(tmp_path)
    batch = make_batch(tok, ["7"], ["7"])
    batch["data_source"] = ["my/dataset"]
    with pytest.raises(RewardError, match=r"data row 0: data_source 'my/dataset' has no reward scorer"):
        worker.compute_reward(batch)


def test_a_scorer_that_never_returns_is_cut_off_by_the_batch_deadline(tmp_path, caplog):
    calls = tmp_path / "calls"
    source = (
        "import time\n"
        "def score(data_source, solution_str, ground_truth, extra_info=None):\n"
        f"    with open({str(calls)!r}, 'a') as f:\n"
        "        f.write('x')\n"
        "    time.sleep(1000)\n"
    )
    worker, tok = worker_with(tmp_path, source, timeout_s=0.4, batch_timeout_s=1.0, error_score=-1.0)
    batch = make_batch(tok, [str(i) for i in range(8)], ["0"] * 8)
    with caplog.at_level("WARNING"):
        out = worker.compute_reward(batch)
    # Each attempt waits 0.4 s, so the 1 s batch limit is reached after at most three attempts;
    # the other samples are not tried at all.
    assert 1 <= len(calls.read_text()) <= 3
    assert out["reward_timed_out"].tolist() == [1.0] * 8
    assert out["scores"].tolist() == [-1.0] * 8
    assert "timed out on 8 sample(s), data rows [0, 1, 2, 3, 4, 5, 6, 7]" in caplog.text
