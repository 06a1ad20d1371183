"""Run logging: a console progress line, metrics.jsonl, wandb (offline by default), tensorboard.

Only the global rank 0 writes. Every logged step is one JSON object in <run_dir>/metrics.jsonl
(`step`, `loss`, `lr`, `grad_norm`, `consumed_samples`, `tokens`, `tokens_per_s`, `mfu`, and `val_loss` when
evaluated); the resolved config is written beside it as config.yaml by the trainer.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Optional

import torch

from attnres_train.model.structure import num_mla_layers

PEAK_FLOPS_ENV = "ATTNRES_PEAK_FLOPS"

# Dense bf16 peak of common accelerators (FLOP/s), for the MFU estimate.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "B200": 2250e12}


def device_peak_flops(peak_flops: Optional[float] = None) -> float:
    """The device's peak FLOP/s for the MFU estimate: $ATTNRES_PEAK_FLOPS if set (the profiler
    pins one value for both of its runs), else `peak_flops` (the config's logging.peak_flops) if
    given, else a table for GPUs; on CPU a measured fp32 GEMM rate (0.2 s probe)."""
    if os.environ.get(PEAK_FLOPS_ENV):
        return float(os.environ[PEAK_FLOPS_ENV])
    if peak_flops is not None:
        return float(peak_flops)
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, peak in GPU_PEAK_FLOPS.items():
            if key in name:
                return peak
        return 312e12
    n = 512
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.2:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start)


def model_flops_per_token(model_cfg, params_active_nonembedding: int) -> float:
    """Training FLOPs per token: 6·N (matmuls fwd+bwd) + causal MLA attention scores/values."""
    m = model_cfg.mla
    attn = 2 * (model_cfg.seq_length / 2) * m.num_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
    return 6 * params_active_nonembedding + 3 * num_mla_layers(model_cfg) * attn


# The console progress line: (record key, how it is shown), in order; absent keys are skipped.
PROGRESS_FIELDS = (
    ("loss", "loss {:.4f}"),
    ("val_loss", "val_loss {:.4f}"),
    ("lr", "lr {:.2e}"),
    ("grad_norm", "gnorm {:.3f}"),
    ("tokens_per_s", "{:,.0f} tok/s"),
    ("mfu", "mfu {:.1%}"),  # '%' multiplies by 100 (as a float, like 100 * v)
    ("update_skipped", "update skipped: {}"),
)


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class RunLogger:
    def __init__(self, run_dir: Path, cfg, *, total_steps: int, enabled: bool, resolved_config: dict):
        self.enabled = enabled
        self.total_steps = total_steps
        self.start = time.time()
        self.start_step = 0
        self.run_dir = run_dir
        self.tb = self.wandb = None
        if not enabled:
            return
        self.metrics = open(run_dir / "metrics.jsonl", "a")
        if cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                print("tensorboard is not installed: skipping tensorboard events")
        w = cfg.logging.wandb
        if w.enabled and w.mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(project=w.project, entity=w.entity, mode=w.mode,
                                    dir=str(run_dir), config=resolved_config,
                                    name=run_dir.name, resume="allow")

    def set_start(self, step: int) -> None:
        """Training (re)starts after `step`: drop records a killed run logged past its checkpoint."""
        self.start_step = step
        self.start = time.time()
        if self.enabled:
            path = self.run_dir / "metrics.jsonl"
            keep = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= step]
            self.metrics.close()
            path.write_text("".join(line + "\n" for line in keep))
            self.metrics = open(path, "a")

    def log(self, step: int, record: dict, *, console: bool = True) -> None:
        if not self.enabled:
            return
        record = {"step": step, **record}
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if console:
            print(self.progress_line(step, record), flush=True)

    def progress_line(self, step: int, r: dict) -> str:
        elapsed = time.time() - self.start
        done = max(step - self.start_step, 1)
        eta = elapsed / done * (self.total_steps - step)
        parts = [f"step {step}/{self.total_steps}"]
        parts += [fmt.format(r[key]) for key, fmt in PROGRESS_FIELDS if key in r]
        parts.append(f"elapsed {_fmt_time(elapsed)} eta {_fmt_time(eta)}")
        return " | ".join(parts)

    def close(self) -> None:
        if not self.enabled:
            return
        self.metrics.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
