"""Deterministic, resumable order of prompt batches over epochs.

The order depends only on (seed, epoch), and the position is two integers, so a resumed run
continues with exactly the next unseen batch.
"""

from __future__ import annotations

from typing import Iterator

import torch


class PromptBatches:
    def __init__(self, num_rows: int, batch_size: int, shuffle: bool = True, seed: int = 1) -> None:
        if batch_size > num_rows:
            raise ValueError(
                f"data.train_batch_size={batch_size} is larger than the dataset ({num_rows} rows): "
                f"lower data.train_batch_size or add data"
            )
        self.num_rows = num_rows
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.batch_in_epoch = 0

    @property
    def batches_per_epoch(self) -> int:
        # The last incomplete batch is dropped so every step sees the same number of prompts.
        return self.num_rows // self.batch_size

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_rows))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_rows, generator=gen).tolist()

    def next_indices(self) -> list[int]:
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch += 1
            self.batch_in_epoch = 0
        order = self._order(self.epoch)
        start = self.batch_in_epoch * self.batch_size
        self.batch_in_epoch += 1
        return order[start : start + self.batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_indices()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
