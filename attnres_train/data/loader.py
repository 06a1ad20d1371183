"""Micro-batches for the schedule: which samples a data-parallel rank trains on at each step.

The dataset is map-style with a fixed index -> sample mapping, so the data position is just the
step: global batch g covers samples [g·G, (g+1)·G) (G = global batch size). Each micro-batch j of
that global batch holds dp·b consecutive samples and rank r takes its b of them, as Megatron-LM's
pretraining sampler does. Resuming at step k therefore needs no state beyond k.
"""

from __future__ import annotations

import numpy as np
import torch

KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def collate(samples: list) -> dict:
    """Stack GPTDataset samples into [B, S] tensors (megatron's model wants int64 ids)."""
    batch = {k: torch.from_numpy(np.stack([np.asarray(s[k]) for s in samples])) for k in KEYS}
    for k in ("tokens", "labels", "position_ids"):
        batch[k] = batch[k].long()
    batch["loss_mask"] = batch["loss_mask"].float()
    if torch.cuda.is_available():
        batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
    return batch


class MicroBatches:
    def __init__(self, dataset, *, micro_batch_size: int, num_micro: int, dp_rank: int, dp_size: int):
        self.dataset = dataset
        self.b, self.num_micro, self.dp_rank, self.dp_size = micro_batch_size, num_micro, dp_rank, dp_size

    def indices(self, step: int) -> list:
        """This rank's sample indices at `step`, one list per micro-batch."""
        per_micro = self.b * self.dp_size
        start = step * per_micro * self.num_micro
        return [list(range(start + j * per_micro + self.dp_rank * self.b,
                           start + j * per_micro + (self.dp_rank + 1) * self.b))
                for j in range(self.num_micro)]

    def for_step(self, step: int) -> list:
        n = len(self.dataset)
        return [collate([self.dataset[i % n] for i in idx]) for idx in self.indices(step)]

    def eval_batches(self, limit: int = 0) -> list:
        """Consecutive micro-batches over the dataset (all full ones, or the first `limit`)."""
        per_micro = self.b * self.dp_size
        count = len(self.dataset) // per_micro
        if limit:
            count = min(count, limit)
        return [collate([self.dataset[j * per_micro + self.dp_rank * self.b + i] for i in range(self.b)])
                for j in range(count)]
