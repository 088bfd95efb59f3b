"""Greedy accuracy of a model folder on prompt parquet, scored like the trainer's rewards.

    python -m rlflow.evaluate MODEL_DIR demo:arithmetic/test.parquet
    python -m rlflow.evaluate MODEL_DIR data.parquet reward.custom_fn.path=my_reward.py reward.custom_fn.name=score

Runs in one process with HF ``generate`` (no Ray): a quick check of a checkpoint export or a
data-engine round, not a replacement for the trainer's validation. Arguments with ``=`` are
``reward.*`` overrides, so a run's custom reward (``reward.custom_fn`` or ``reward.fns``)
scores the answers exactly as in training; without them the built-in scorers by
``data_source`` do.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Sequence

import torch
from omegaconf import OmegaConf

from rlflow.data.rlhf_dataset import RLHFDataset, collate_fn
from rlflow.errors import RLFlowError
from rlflow.models.loading import load_causal_lm, load_tokenizer
from rlflow.rewards.combine import resolve_reward_fn
from rlflow.rewards.registry import default_compute_score
from rlflow.utils.torch_functional import get_response_mask


@torch.no_grad()
def greedy_accuracy(model_path: str, files: list[str], max_prompt_length: int = 16,
                    max_response_length: int = 4, batch_size: int = 256, score_fn: Optional[Any] = None) -> float:
    """Mean score of greedy answers; ``score_fn`` (default: the built-in registry) is called
    with the reward keywords ``data_source, solution_str, ground_truth, extra_info``."""
    score_fn = score_fn or default_compute_score
    model_cfg = OmegaConf.create({"path": model_path, "tokenizer_path": None, "trust_remote_code": False,
                                  "dtype": "float32", "attn_implementation": "auto"})
    tokenizer = load_tokenizer(model_cfg)
    model = load_causal_lm(model_cfg).eval()
    data = RLHFDataset(files, tokenizer, max_prompt_length=max_prompt_length, truncation="left")
    eos = tokenizer.eos_token_id
    correct = 0.0
    for start in range(0, len(data), batch_size):
        rows = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        batch = collate_fn(rows)
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             max_new_tokens=max_response_length, do_sample=False, eos_token_id=eos,
                             pad_token_id=tokenizer.pad_token_id)
        responses = out[:, batch["input_ids"].shape[1]:]
        lengths = get_response_mask(responses, eos, tokenizer.pad_token_id).sum(-1)
        for i, row in enumerate(rows):
            text = tokenizer.decode(responses[i, : int(lengths[i])].tolist(), skip_special_tokens=True)
            result = score_fn(data_source=row["data_source"], solution_str=text,
                              ground_truth=(row["reward_model"] or {}).get("ground_truth"),
                              extra_info=row["extra_info"])
            correct += float(result["score"] if isinstance(result, dict) else result)
    return correct / len(data)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlflow.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("files", nargs="+", help="parquet files, then optional reward.* overrides (key=value)")
    parser.add_argument("--max_prompt_length", type=int, default=16)
    parser.add_argument("--max_response_length", type=int, default=4)
    args = parser.parse_args(argv)
    files = [f for f in args.files if "=" not in f]
    overrides = [f for f in args.files if "=" in f]
    try:
        bad = [o for o in overrides if not o.lstrip("+").startswith("reward.")]
        if bad:
            raise RLFlowError(f"'{bad[0]}': only reward.* settings apply here (reward.custom_fn.path=..., reward.fns=[...])")
        from rlflow.config.compose import compose_config

        score_fn = resolve_reward_fn(compose_config(overrides=overrides).reward)
        accuracy = greedy_accuracy(args.model, files, args.max_prompt_length, args.max_response_length,
                                   score_fn=score_fn)
    except (RLFlowError, ValueError, FileNotFoundError) as exc:
        print(f"rlflow.evaluate: error: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"{accuracy:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
