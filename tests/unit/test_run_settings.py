"""Run-length precedence, the list hint for data files, and custom rewards in rlflow.evaluate."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from rlflow.config.compose import compose_config
from rlflow.errors import ConfigError
from rlflow.trainer.startup import total_training_steps


def test_epochs_on_the_command_line_beat_the_recipes_step_count():
    assert compose_config("grpo").trainer.total_steps == 200  # the recipe's default
    cfg = compose_config("grpo", ["trainer.total_epochs=3"])
    assert cfg.trainer.total_steps is None and cfg.trainer.total_epochs == 3
    assert total_training_steps(cfg.trainer, batches_per_epoch=64) == 192


def test_steps_given_by_the_user_win_over_epochs_and_say_so(capsys):
    cfg = compose_config("grpo", ["trainer.total_epochs=3", "trainer.total_steps=10"])
    assert total_training_steps(cfg.trainer, batches_per_epoch=64) == 10
    line = capsys.readouterr().out.strip()
    assert "trainer.total_steps=10 and trainer.total_epochs=3" in line and "total_steps=null" in line
    # epochs left at their default: no line
    assert total_training_steps(compose_config("grpo", ["trainer.total_steps=7"]).trainer, 64) == 7
    assert capsys.readouterr().out == ""
    assert total_training_steps(OmegaConf.create({"total_steps": None, "total_epochs": 2}), 5) == 10


@pytest.mark.parametrize("key", ["data.train_files", "data.val_files"])
def test_a_plain_string_for_data_files_gets_the_list_syntax(key):
    with pytest.raises(ConfigError) as err:
        compose_config("grpo", [f"{key}=/data/train.parquet"])
    assert str(err.value) == (
        f"{key} takes a list, not a single value: write {key}=[/data/train.parquet] (several: {key}=[a,b])"
    )


# ---------------------------------------------------------------- rlflow.evaluate
REWARD_FILE = '''
def by_length(data_source, solution_str, ground_truth, extra_info=None):
    return {"score": float(len(solution_str) == 4), "length": len(solution_str)}

def always_half(data_source, solution_str, ground_truth, extra_info=None):
    return 0.5
'''


@pytest.fixture(scope="module")
def eval_inputs(tmp_path_factory):
    from rlflow.demo.assets import ensure_demo_model

    root = tmp_path_factory.mktemp("eval")
    rows = [{"data_source": "no_builtin_scorer", "prompt": [{"role": "user", "content": f"{i}+1="}],
             "ability": "math", "reward_model": {"style": "rule", "ground_truth": str(i + 1)},
             "extra_info": {"index": i}} for i in range(6)]
    data = root / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    (root / "my_reward.py").write_text(REWARD_FILE)
    return ensure_demo_model(), str(data), str(root / "my_reward.py")


def greedy_lengths(model_path: str, data: str) -> list[int]:
    """Lengths of the demo model's greedy answers, decoded without special tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlflow.data.rlhf_dataset import RLHFDataset, collate_fn
    from rlflow.utils.torch_functional import get_response_mask

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    ds = RLHFDataset([data], tok, max_prompt_length=16, truncation="left")
    batch = collate_fn([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=4,
                             do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    resp = out[:, batch["input_ids"].shape[1]:]
    n = get_response_mask(resp, tok.eos_token_id, tok.pad_token_id).sum(-1)
    return [len(tok.decode(r[: int(k)].tolist(), skip_special_tokens=True)) for r, k in zip(resp, n)]


def test_evaluate_scores_with_a_custom_reward(eval_inputs, capsys):
    from rlflow.evaluate import main

    model, data, reward = eval_inputs
    expected = sum(n == 4 for n in greedy_lengths(model, data)) / 6
    assert main([model, data, f"reward.custom_fn.path={reward}", "reward.custom_fn.name=by_length"]) == 0
    assert capsys.readouterr().out.strip() == f"{expected:.4f}"
    # reward.fns wins over reward.custom_fn, as in training
    fns = f"reward.fns=[{{path:{reward},name:always_half,weight:2.0}}]"
    assert main([model, data, fns, f"reward.custom_fn.path={reward}", "reward.custom_fn.name=by_length"]) == 0
    assert capsys.readouterr().out.strip() == "1.0000"


def test_evaluate_errors_are_one_line(eval_inputs, capsys):
    from rlflow.evaluate import main

    model, data, _ = eval_inputs
    assert main([model, data]) == 2  # no scorer for this data_source: the message says what to set
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "reward.custom_fn" in err
    assert main([model, data, "actor.optim.lr=1"]) == 2
    assert "only reward.* settings apply" in capsys.readouterr().err


def test_configuration_page_covers_the_keys_and_is_linked():
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    page = (repo / "docs" / "configuration.md").read_text()
    assert "docs/configuration.md" in (repo / "README.md").read_text()
    for key in ("reward.custom_fn", "reward.fns", "solution_str", "skip_special_tokens", "reward/<key>",
                "use_sequence_packing", "use_dynamic_bsz", "max_tokens_per_microbatch", "data.packer",
                "data.custom_cls", "model.attn_implementation", "model.disable_dropout", "val_before_train",
                "total_epochs", "Gemma2", "GPT-2"):
        assert key in page, key
