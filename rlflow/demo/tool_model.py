"""Offline demo assets for multi-turn tool use: a warm-started tool-calling LM and its task.

    demo:tiny-tool-lm     -> HF model folder: the demo model's architecture, briefly
                             supervised-trained to call a calculator about half of the time
    demo:calculator       -> folder with train.parquet and test.parquet of "AB+CD=" prompts

Why a warm start: RL on a randomly initialised model cannot discover a tool-call format from
scratch; the chance of sampling ``<tool_call>`` + a correct expression + the closing tag +
copying the result is vanishingly small. Real agent RL starts from an instruct model that
already knows its tool format, so the demo does the same in miniature: a short SFT on
calculator conversations where half of the episodes use the tool and half answer directly.
The tiny model cannot add two-digit numbers, so a direct answer is almost always wrong and a
tool call almost always right; RL then has a clean signal to push the tool-call rate to 1.

Token format (one id per tag; digits and ``+`` one id per character)::

    <|user|>37+58=<|end|><|assistant|><tool_call>37+58</tool_call><|end|>
    <|tool|>95<|end|><|assistant|>95<|end|>

``<|tool|>`` is a special (role) token like ``<|user|>``. ``<tool_call>`` and ``</tool_call>``
are added but not special, as in common instruct models: decoding with
``skip_special_tokens=True`` keeps them, so the call stays visible to code that parses it out
of decoded text. The tool model's tokenizer extends the demo tokenizer: every demo id keeps its
meaning and the three new tokens take the next ids.

Like the demo model, the asset lives at ``<demo dir>/tiny-tool-lm-<fingerprint>`` where the
fingerprint covers every constant below (and the demo model's own), so tuning one builds a
fresh folder. ``TOOL_BUILD_VERSION`` is bumped when the building code changes.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from rlflow.demo import assets

TOOL_MODEL_NAME = assets.TOOL_MODEL_NAME
CALCULATOR_DATA_NAME = assets.CALCULATOR_DATA_NAME
TOOL_BUILD_VERSION = 1

# ---- tokenizer -----------------------------------------------------------------------------
TOOL_ROLE_TOKEN = "<|tool|>"
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_ROLES = ("system", "user", "assistant", "tool")
TOOL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('unsupported role ' + message['role'] + '; use system, user, assistant or tool') }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# ---- calculator task -----------------------------------------------------------------------
MIN_OPERAND = 10
MAX_OPERAND = 99
CALCULATOR_SEED = 0
CALCULATOR_TRAIN_SIZE = 2048
CALCULATOR_TEST_SIZE = 256

# ---- warm-start SFT ------------------------------------------------------------------------
# Half of the SFT episodes call the tool: RL starts from a policy that uses it sometimes.
TOOL_CALL_PROBABILITY = 0.5
SFT_SEED = 0
# About 30 s on one CPU thread. After it, sampling at temperature 1 calls the tool in about half
# of the episodes, and a call copies the prompt's expression, and the answer the tool's result,
# in about 99% of them (benchmarks/tool_model_check.py). 400 steps already get there; the
# margin covers numerical differences between torch builds.
SFT_STEPS = 600
SFT_BATCH_SIZE = 64
SFT_LR = 3e-3
SFT_WARMUP_STEPS = 30
SFT_WEIGHT_DECAY = 0.0
SFT_BETAS = (0.9, 0.98)


def tool_model_spec(sft_steps: int | None = None) -> dict[str, Any]:
    """Every constant that shapes the tool model, for its folder's fingerprint."""
    if sft_steps is None:
        sft_steps = SFT_STEPS
    return {
        "base": assets._model_spec(),
        "build_version": TOOL_BUILD_VERSION,
        "extra_special_tokens": [TOOL_ROLE_TOKEN],
        "extra_tokens": [TOOL_CALL_OPEN, TOOL_CALL_CLOSE],
        "chat_template": TOOL_CHAT_TEMPLATE,
        "min_operand": MIN_OPERAND,
        "max_operand": MAX_OPERAND,
        "tool_call_probability": TOOL_CALL_PROBABILITY,
        "sft_seed": SFT_SEED,
        "sft_steps": sft_steps,
        "sft_batch_size": SFT_BATCH_SIZE,
        "sft_lr": SFT_LR,
        "sft_warmup_steps": SFT_WARMUP_STEPS,
        "sft_weight_decay": SFT_WEIGHT_DECAY,
        "sft_betas": list(SFT_BETAS),
    }


def calculator_data_spec() -> dict[str, Any]:
    return {
        "seed": CALCULATOR_SEED,
        "train_size": CALCULATOR_TRAIN_SIZE,
        "test_size": CALCULATOR_TEST_SIZE,
        "min_operand": MIN_OPERAND,
        "max_operand": MAX_OPERAND,
    }


def build_tool_tokenizer():
    """The demo tokenizer plus ``<|tool|>``, ``<tool_call>`` and ``</tool_call>``."""
    return assets.build_demo_tokenizer(
        extra_special_tokens=(TOOL_ROLE_TOKEN,),
        extra_tokens=(TOOL_CALL_OPEN, TOOL_CALL_CLOSE),
        chat_template=TOOL_CHAT_TEMPLATE,
    )


def calculator_conversation(a: int, b: int, rng: random.Random) -> list[dict[str, str]]:
    """One SFT episode for ``a+b=``: the tool path with probability ``TOOL_CALL_PROBABILITY``,
    else a direct answer drawn uniformly from the range of possible sums (so almost always
    wrong, as the tiny model's own answer would be)."""
    expression = f"{a}+{b}"
    messages = [{"role": "user", "content": f"{expression}="}]
    if rng.random() < TOOL_CALL_PROBABILITY:
        result = str(a + b)
        messages += [
            {"role": "assistant", "content": f"{TOOL_CALL_OPEN}{expression}{TOOL_CALL_CLOSE}"},
            {"role": "tool", "content": result},
            {"role": "assistant", "content": result},
        ]
    else:
        guess = rng.randint(2 * MIN_OPERAND, 2 * MAX_OPERAND)
        messages.append({"role": "assistant", "content": str(guess)})
    return messages


def encode_conversations(
    tokenizer, conversations: list[list[dict[str, str]]]
) -> tuple[list[list[int]], list[list[bool]]]:
    """Token ids of each conversation as the chat template renders it, and a mask that is
    True on the tokens the model is trained to produce: each assistant message's content and
    its closing ``<|end|>``. The ``<|assistant|>`` role token before it is context (the
    generation prompt), like every user and tool token."""
    texts = [f"<|{m['role']}|>{m['content']}<|end|>" for conv in conversations for m in conv]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"])
    all_ids, all_masks = [], []
    for conv in conversations:
        ids: list[int] = []
        mask: list[bool] = []
        for message in conv:
            message_ids = next(encoded)
            trained = message["role"] == "assistant"
            ids += message_ids
            mask += [False] + [trained] * (len(message_ids) - 1)
        all_ids.append(ids)
        all_masks.append(mask)
    return all_ids, all_masks


def _batch(tokenizer, rng: random.Random, size: int):
    import torch

    conversations = []
    for _ in range(size):
        a, b = rng.randint(MIN_OPERAND, MAX_OPERAND), rng.randint(MIN_OPERAND, MAX_OPERAND)
        conversations.append(calculator_conversation(a, b, rng))
    ids, masks = encode_conversations(tokenizer, conversations)
    width = max(map(len, ids))
    input_ids = torch.full((size, width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((size, width), dtype=torch.long)
    labels = torch.full((size, width), -100, dtype=torch.long)
    for row, (seq, mask) in enumerate(zip(ids, masks)):
        # Right padding: positions then match those of an unpadded rollout.
        input_ids[row, : len(seq)] = torch.tensor(seq)
        attention[row, : len(seq)] = 1
        labels[row, : len(seq)] = torch.tensor([t if m else -100 for t, m in zip(seq, mask)])
    return input_ids, attention, labels


def supervised_warm_start(model, tokenizer, steps: int) -> list[float]:
    """Train ``model`` in place on freshly drawn calculator conversations (teacher forcing,
    loss on assistant tokens only). Returns the loss of each step.

    Runs on one torch thread with fixed seeds, so the weights are the same on every machine
    that has the same torch build; the caller's thread count and RNG state are restored.
    """
    import torch

    rng = random.Random(SFT_SEED)
    threads = torch.get_num_threads()
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SFT_SEED)
        torch.set_num_threads(1)
        try:
            optimizer = torch.optim.AdamW(
                model.parameters(), lr=SFT_LR, betas=SFT_BETAS, weight_decay=SFT_WEIGHT_DECAY
            )
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, steps))
            model.train()
            for _ in range(steps):
                input_ids, attention, labels = _batch(tokenizer, rng, SFT_BATCH_SIZE)
                loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
            model.eval()
        finally:
            torch.set_num_threads(threads)
    return losses


def _lr_factor(step: int, steps: int) -> float:
    """Linear warm-up, then linear decay to zero at ``steps``."""
    if step < SFT_WARMUP_STEPS:
        return (step + 1) / SFT_WARMUP_STEPS
    return max(0.0, (steps - step) / max(1, steps - SFT_WARMUP_STEPS))


def build_tool_model(sft_steps: int | None = None):
    """``(model, tokenizer)``: the demo architecture, seeded init, then the warm-start SFT."""
    tokenizer = build_tool_tokenizer()
    model = assets.build_demo_model(tokenizer)
    supervised_warm_start(model, tokenizer, SFT_STEPS if sft_steps is None else sft_steps)
    return model, tokenizer


def ensure_tool_model(sft_steps: int | None = None) -> str:
    """Return the path of the tool model folder, building it on first use.

    ``sft_steps`` (default ``SFT_STEPS``) is part of the fingerprint, so a shorter run (for
    quick tests) gets its own folder and never stands in for the real asset.
    """
    if sft_steps is None:
        sft_steps = SFT_STEPS
    if not isinstance(sft_steps, int) or isinstance(sft_steps, bool) or sft_steps < 0:
        raise ValueError(f"sft_steps must be a non-negative int, got {sft_steps!r}")

    def write(folder: Path) -> None:
        from transformers.utils import logging as hf_logging

        model, tokenizer = build_tool_model(sft_steps)
        hf_logging.disable_progress_bar()
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    target = assets._demo_dir() / f"{TOOL_MODEL_NAME}-{assets._fingerprint(tool_model_spec(sft_steps))}"
    return str(assets._build_atomically(target, write))


def ensure_calculator_data() -> dict[str, str]:
    """Return ``{"train": path, "test": path}`` of the calculator prompts, creating them first."""

    def write(folder: Path) -> None:
        from rlflow.utils.bundled import import_data_preprocess

        calculator = import_data_preprocess("calculator")
        calculator.write_splits(
            folder,
            train_size=CALCULATOR_TRAIN_SIZE,
            test_size=CALCULATOR_TEST_SIZE,
            seed=CALCULATOR_SEED,
            min_operand=MIN_OPERAND,
            max_operand=MAX_OPERAND,
        )

    return assets.build_splits(CALCULATOR_DATA_NAME, calculator_data_spec(), write)
