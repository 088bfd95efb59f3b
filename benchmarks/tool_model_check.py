"""How the warm-started tool model (``demo:tiny-tool-lm``) behaves on the calculator task.

Samples episodes with plain transformers on one torch thread, no Ray: the first assistant
turn is generated from ``<|user|>AB+CD=<|end|><|assistant|>``; if it is exactly
``<tool_call>EXPR</tool_call>`` with EXPR made of digits and ``+``, the tool's result is
appended as ``<|tool|>RESULT<|end|><|assistant|>`` and a second turn is generated. The last
assistant turn is scored by the arithmetic rule (first integer equals the sum).

Printed: the tool-call rate; among tool calls, how often the argument is the prompt's
expression and how often the final answer is exactly the tool's result; the success rate of
episodes with and without a tool call, and overall. RL on this model should raise the tool-call
rate (and with it the overall success) towards 1.

    python benchmarks/tool_model_check.py                 # the built demo asset, 200 episodes
    python benchmarks/tool_model_check.py --episodes 500 --seed 1
    python benchmarks/tool_model_check.py --model PATH    # e.g. a checkpoint after RL
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time

import torch

from rlflow.demo import tool_model
from rlflow.rewards.arithmetic import compute_score

_CALL = re.compile(re.escape(tool_model.TOOL_CALL_OPEN) + r"(.*)" + re.escape(tool_model.TOOL_CALL_CLOSE))
_EXPRESSION = re.compile(r"\d+(\+\d+)*")
MAX_TURN_TOKENS = 16


def parse_tool_call(text: str) -> str | None:
    """The call's argument when the whole turn is one tool call, else None."""
    match = _CALL.fullmatch(text)
    return match.group(1) if match else None


def evaluate(expression: str) -> int | None:
    """The calculator: sums of non-negative integers only, None for anything else."""
    if not _EXPRESSION.fullmatch(expression):
        return None
    return sum(int(term) for term in expression.split("+"))


def _turn(model, tokenizer, ids: list[int]) -> tuple[list[int], bool]:
    """Sample one assistant turn after ``ids``: its ids (stop token included when it stopped)
    and whether it stopped on ``<|end|>`` within the budget."""
    prompt = torch.tensor([ids])
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=MAX_TURN_TOKENS,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    new = out[0, len(ids):].tolist()
    return new, bool(new) and new[-1] == tokenizer.eos_token_id


def _render(tokenizer, messages: list[dict]) -> list[int]:
    """Ids of ``messages`` rendered by the chat template, with the assistant generation prompt."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def run_episode(model, tokenizer, a: int, b: int) -> dict:
    """One calculator episode; returns what happened as flags for the summary."""
    ids = _render(tokenizer, [{"role": "user", "content": f"{a}+{b}="}])
    first, stopped = _turn(model, tokenizer, ids)
    text = tokenizer.decode(first[:-1] if stopped else first)
    argument = parse_tool_call(text) if stopped else None
    episode = {"tool_call": argument is not None, "argument_ok": False, "answer_ok": False}
    answer = text
    if argument is not None:
        episode["argument_ok"] = argument == f"{a}+{b}"
        result = evaluate(argument)
        if result is None:
            episode["success"] = False
            return episode
        # "<|tool|>RESULT<|end|><|assistant|>", appended after the model's own ids.
        observation = _render(tokenizer, [{"role": "tool", "content": str(result)}])
        second, stopped = _turn(model, tokenizer, ids + first + observation)
        answer = tokenizer.decode(second[:-1] if stopped else second)
        episode["answer_ok"] = stopped and answer == str(result)
    episode["success"] = compute_score(answer, a + b) == 1.0
    return episode


def summarize(episodes: list[dict]) -> dict:
    def rate(flag: str, among: list[dict]) -> float | None:
        return round(sum(e[flag] for e in among) / len(among), 3) if among else None

    with_tool = [e for e in episodes if e["tool_call"]]
    without_tool = [e for e in episodes if not e["tool_call"]]
    return {
        "episodes": len(episodes),
        "tool_call_rate": rate("tool_call", episodes),
        "argument_copy_accuracy": rate("argument_ok", with_tool),
        "answer_copy_accuracy": rate("answer_ok", with_tool),
        "success_with_tool": rate("success", with_tool),
        "success_without_tool": rate("success", without_tool),
        "success_overall": rate("success", episodes),
    }


def measure(model, tokenizer, episodes: int, seed: int) -> dict:
    """Sample ``episodes`` episodes on random two-digit prompts and summarize them."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    runs = [
        run_episode(
            model,
            tokenizer,
            rng.randint(tool_model.MIN_OPERAND, tool_model.MAX_OPERAND),
            rng.randint(tool_model.MIN_OPERAND, tool_model.MAX_OPERAND),
        )
        for _ in range(episodes)
    ]
    return summarize(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: demo:tiny-tool-lm)")
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    path = args.model or tool_model.ensure_tool_model()
    resolve_s = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    start = time.perf_counter()
    with torch.no_grad():
        summary = measure(model, tokenizer, args.episodes, args.seed)
    summary.update(model=path, resolve_s=round(resolve_s, 1), sample_s=round(time.perf_counter() - start, 1))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
