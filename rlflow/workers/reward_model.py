"""A reward-model worker: an HF sequence-classification model scores (prompt, answer) pairs.

The conversation is rendered with the reward model's own chat template (prompt messages plus
the answer as the assistant turn) and the first logit of the last token is the score, the
usual layout of RLHF reward models.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlflow.config.schema import typed_config
from rlflow.data.batched_data_dict import BatchedDataDict
from rlflow.models.loading import resolve_model_path, torch_dtype
from rlflow.workers.base import Worker


class RewardModelWorker(Worker):
    def __init__(self, config: dict, model_path: str, micro_batch_size: int = 32) -> None:
        super().__init__()
        self.cfg = typed_config(config)
        path = resolve_model_path(model_path)
        trust = self.cfg.model.trust_remote_code
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=torch_dtype(self.cfg.model.dtype), trust_remote_code=trust, use_safetensors=True
        )
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.eval()
        self.micro_batch_size = micro_batch_size

    @torch.no_grad()
    def score(self, batch: BatchedDataDict) -> BatchedDataDict:
        """``batch`` holds ``prompt`` (chat messages) and ``response`` (text) per row."""
        texts = [
            self.tokenizer.apply_chat_template(list(messages) + [{"role": "assistant", "content": answer}], tokenize=False)
            for messages, answer in zip(batch["prompt"], batch["response"])
        ]
        scores: list[torch.Tensor] = []
        for start in range(0, len(texts), self.micro_batch_size):
            enc = self.tokenizer(
                texts[start : start + self.micro_batch_size], return_tensors="pt", padding=True,
                add_special_tokens=False,
            )
            logits: Any = self.model(**enc).logits
            scores.append(logits[:, 0].float())
        return BatchedDataDict({"scores": torch.cat(scores)})
