"""A parquet file in the exact layout verl's gsm8k preprocessing writes trains unchanged."""

from __future__ import annotations

import pytest

import rlflow

INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'

# Rows as verl's examples/data_preprocess/gsm8k.py builds them (question + instruction as one
# user message, the number after "####" as ground truth, the raw fields in extra_info), and
# written the way it writes them: datasets.Dataset.to_parquet.
RAW = [
    ("Tom has 3 apples and buys 4 more. How many apples?", "3+4=7\n#### 7"),
    ("A box holds 12 pens. How many pens in 2 boxes?", "12*2=24\n#### 24"),
    ("Sara had 1,200 dollars and spent 200. How much is left?", "1200-200=1000\n#### 1,000"),
    ("There are 5 birds and 2 fly away. How many remain?", "5-2=3\n#### 3"),
]


def verl_rows(split):
    rows = []
    for idx, (question, answer) in enumerate(RAW):
        rows.append({
            "data_source": "openai/gsm8k",
            "prompt": [{"role": "user", "content": question + " " + INSTRUCTION}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": answer.split("#### ")[1].replace(",", "")},
            "extra_info": {"split": split, "index": idx, "answer": answer, "question": question},
        })
    return rows * 4


@pytest.mark.ray
def test_verl_gsm8k_parquet_trains_two_steps(ray_cluster, tmp_path):
    import datasets
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rlflow.demo.assets import ensure_demo_model

    train = tmp_path / "train.parquet"
    datasets.Dataset.from_list(verl_rows("train")).to_parquet(str(train))
    # GSM8K prompts are far longer than the demo's: same tokenizer, longer position range.
    tokenizer = AutoTokenizer.from_pretrained(ensure_demo_model())
    model_dir = tmp_path / "model"
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    cfg = rlflow.compose_config("grpo", [
        f"model.path={model_dir}", f"data.train_files=[{train}]", "data.max_prompt_length=160",
        "data.max_response_length=8", "data.train_batch_size=4", "rollout.n=2", "actor.ppo_mini_batch_size=4",
        "trainer.total_steps=2", f"trainer.output_dir={tmp_path / 'out'}", "trainer.progress_bar=false",
    ])
    trainer = rlflow.build_trainer(cfg)
    try:
        history = trainer.fit()
    finally:
        trainer.close()
    assert [row["step"] for row in history] == [1, 2]
    assert all(0.0 <= row["reward/mean"] <= 1.0 for row in history)
    assert history[-1]["prompt_length/mean"] > 60  # the whole question and instruction went in
