"""Micro-batches for the schedule: which samples a data-parallel rank trains on at each step.

The datasets are map-style with a fixed index -> sample mapping, so the data position is just the
step: step k trains on the global batch starting at sample k·G (`batch_indices`). Resuming at
step k therefore needs no state beyond k.
"""

from __future__ import annotations

from attnres_train.data.dataset import batch_indices, collate


class MicroBatches:
    def __init__(self, dataset, *, micro_batch_size: int, num_micro: int, dp_rank: int, dp_size: int):
        self.dataset = dataset
        self.b, self.num_micro, self.dp_rank, self.dp_size = micro_batch_size, num_micro, dp_rank, dp_size

    def for_step(self, step: int) -> list:
        """This rank's collated micro-batches ([B, S] tensors) of global batch `step`."""
        gbs = self.b * self.dp_size * self.num_micro
        idx = batch_indices(step * gbs, gbs, self.dp_rank, self.dp_size, self.b)
        n = len(self.dataset)
        return [collate([self.dataset[i % n] for i in idx[j:j + self.b]]) for j in range(0, len(idx), self.b)]

    def eval_batches(self, limit: int = 0) -> list:
        """Micro-batches over the whole split (all full global micro-batch groups, or the first `limit`)."""
        count = len(self.dataset) // (self.b * self.dp_size)
        if limit:
            count = min(count, limit)
        idx = batch_indices(0, count * self.b * self.dp_size, self.dp_rank, self.dp_size, self.b) if count else []
        return [collate([self.dataset[i] for i in idx[j:j + self.b]]) for j in range(0, len(idx), self.b)]
