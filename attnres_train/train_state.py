"""What a checkpoint saves and restores: the model, the optimizer, the LR schedule and the position.

`checkpoint.save(root, state, ...)` writes it and `checkpoint.load(path, state, ...)` fills it in
place; the training loop advances it one step at a time. The RNG streams are saved with it too,
but they are process state (torch's and megatron's generators), not fields here.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


@dataclass
class TrainState:
    """This rank's share of a run, resumable.

    model_chunks: this rank's model chunks (one per virtual pipeline stage), unwrapped: the modules
    whose sharded_state_dict a checkpoint holds (the DDP wrappers add no state of their own).
    step: optimizer steps done. consumed_samples: the data position, in samples of the whole job.
    """

    model_chunks: list
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    step: int = 0
    consumed_samples: int = 0

    def finish_step(self, global_batch_size: int) -> None:
        """Count one more optimizer step and its global batch. The loader reads the next step's
        samples from consumed_samples on (MicroBatches.at), whatever the data-parallel size."""
        self.step += 1
        self.consumed_samples += global_batch_size
