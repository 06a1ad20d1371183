"""Micro-batches for the schedule: which samples a data-parallel rank trains on at each step.

The datasets are map-style with a fixed index -> sample mapping, so the data position is one
number, the samples consumed: a step trains on the global batch that starts there
(`batch_indices`), split over the data-parallel ranks. The union over the ranks is the same global
batch whatever the data-parallel size, so a run resumed on another DP size (same global batch)
trains on exactly the samples an unbroken run would have.
"""

from __future__ import annotations

from attnres_train.data.dataset import batch_indices, collate


class MicroBatches:
    def __init__(self, dataset, *, micro_batch_size: int, num_micro: int, dp_rank: int, dp_size: int):
        self.dataset = dataset
        self.b, self.num_micro, self.dp_rank, self.dp_size = micro_batch_size, num_micro, dp_rank, dp_size

    @property
    def global_batch_size(self) -> int:
        return self.b * self.dp_size * self.num_micro

    def indices(self, consumed_samples: int) -> list:
        """This rank's sample indices of the global batch starting at `consumed_samples`, in
        micro-batch order (wrapping around the dataset)."""
        idx = batch_indices(consumed_samples, self.global_batch_size, self.dp_rank, self.dp_size, self.b)
        return [i % len(self.dataset) for i in idx]

    def at(self, consumed_samples: int) -> list:
        """This rank's collated micro-batches ([B, S] tensors) of the global batch starting at
        sample `consumed_samples`."""
        idx = self.indices(consumed_samples)
        return [collate([self.dataset[i] for i in idx[j:j + self.b]]) for j in range(0, len(idx), self.b)]

    def for_step(self, step: int) -> list:
        """The micro-batches of 0-based step `step` of a run that never changed its global batch."""
        return self.at(step * self.global_batch_size)

    def eval_batches(self, limit: int = 0) -> list:
        """This rank's micro-batches over the whole split (all full groups of one micro-batch per
        data-parallel rank), or over its first `limit` micro-batches of samples in all (`limit` //
        DP size groups, at least one): the same samples on any DP size that divides `limit`."""
        count = len(self.dataset) // (self.b * self.dp_size)
        if limit:
            count = min(count, max(1, limit // self.dp_size))
        idx = batch_indices(0, count * self.b * self.dp_size, self.dp_rank, self.dp_size, self.b) if count else []
        return [collate([self.dataset[i] for i in idx[j:j + self.b]]) for j in range(0, len(idx), self.b)]
