"""Multi-turn episodes on the real model: SmolLM2-135M-Instruct (real ChatML template, 49k
BPE vocabulary) answers, gets a reply, answers again; the actor scores the trajectory's model
tokens as the rollout sampled them, and the reply tokens are where the template puts them.

Workers run in this process (no Ray). The tolerance is the rollout / actor one of
test_real_scoring.py: KV-cached decoding vs one full forward pass, float32.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

import rlflow
from rlflow.data.batched_data_dict import BatchedDataDict
from rlflow.models.loading import load_tokenizer
from rlflow.workers.policy import PolicyWorker
from rlflow.workers.rollout.hf_rollout import HFRolloutWorker

ROLLOUT_TOL = 1e-3
REPLY = "Are you sure? Answer again with the number only."
ENV_FILE = '''
from rlflow.agents.environment import Environment, StepResult

class AskAgain(Environment):
    def step(self, text):
        self.turns = getattr(self, "turns", 0) + 1
        if self.turns == 2:
            return StepResult(reward=float(text.strip().startswith("5")), done=True)
        return StepResult([{"role": "user", "content": "%s"}])
''' % REPLY


def test_two_turn_episodes_on_the_real_model(real_model, tmp_path):
    env_file = tmp_path / "ask_again.py"
    env_file.write_text(ENV_FILE)
    cfg = rlflow.compose_config("grpo", overrides=[
        f"model.path={real_model}", "data.max_prompt_length=64", "data.max_response_length=64",
        "agent.enable=true", "agent.environment=AskAgain", f"agent.environment_path={env_file}",
        "agent.max_turns=2", "agent.max_tokens_per_turn=16", "rollout.temperature=1.0",
    ])
    config = OmegaConf.to_container(cfg, resolve=True)
    tokenizer = load_tokenizer(cfg.model)
    messages = [{"role": "user", "content": "What is 2+3? Reply with the number only."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rows = 4
    batch = BatchedDataDict({
        "raw_prompt": [messages] * rows, "raw_prompt_ids": [prompt_ids] * rows,
        "data_source": ["test"] * rows, "reward_model": [{}] * rows, "extra_info": [{}] * rows,
        "index": list(range(rows)), "tools_kwargs": [{}] * rows,
    })
    out = HFRolloutWorker(config).run_episodes(batch, seed=0)

    assert out["agent/turns"].tolist() == [2.0] * rows, "every first answer ended with <|im_end|>"
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for i in range(rows):
        n = int(out["attention_mask"][i, -64:].sum())
        ids, mask = out["responses"][i, :n].tolist(), out["response_mask"][i, :n].tolist()
        first_end = ids.index(end)
        # The reply sits between the two model turns: ChatML's newline after <|im_end|>,
        # the user turn, the next generation prompt; none of it is trained on.
        reply_text = tokenizer.decode(ids[first_end + 1:mask.index(1, first_end + 1)])
        assert reply_text == f"\n<|im_start|>user\n{REPLY}<|im_end|>\n<|im_start|>assistant\n"
        assert mask[first_end + 1:].count(0) == len(tokenizer(reply_text, add_special_tokens=False)["input_ids"])
    # The actor scores the model's tokens of both turns as the engine sampled them.
    actor = PolicyWorker(config, role="actor").compute_log_prob(out, micro_batch_size=2)["log_probs"]
    model_tokens = out["response_mask"].bool()
    gap = (actor - out["rollout_log_probs"]).abs()[model_tokens]
    assert gap.max() <= ROLLOUT_TOL, gap.max()
    assert model_tokens.sum() >= rows * 4
