"""Graceful stop on SIGUSR1 / SIGTERM: checkpoint after the current step, then exit.

slurm sends SIGUSR1 ahead of the time limit (`#SBATCH --signal=B:USR1@120`, forwarded by
launch/slurm.sbatch) and SIGTERM on preemption or `scancel`; torchrun passes SIGTERM on to its
workers. The handler only sets a flag, so the step in flight finishes normally. The training loop
asks `requested()` after every step; it all-reduces the flag (MAX) over all ranks, so every rank
stops after the same step even when the signal reached only some of them.

Repeated signals are harmless (slurm and torchrun may both deliver one): only SIGKILL, e.g. at the
end of slurm's grace period, stops a run that is still saving.
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionSignal:
    """Installs flag-setting handlers for `signals`; `close()` (or leaving a `with` block) restores
    the previous ones. Handlers can only be installed from the main thread; elsewhere this is inert."""

    def __init__(self, signals=SIGNALS):
        self.received = None  # the first signal this process got (signal.Signals), or None
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
            # restart interrupted system calls (e.g. a blocking read in a collective) instead of EINTR
            signal.siginterrupt(sig, False)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)

    def requested(self) -> bool:
        """True on every rank when any rank received a signal. A collective: call it on all ranks
        at the same point of the loop."""
        flag = self.received is not None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    @property
    def reason(self) -> str:
        return self.received.name if self.received is not None else "signal received by another rank"

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        self._previous = {}

    def __enter__(self) -> "PreemptionSignal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
