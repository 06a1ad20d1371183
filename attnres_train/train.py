"""`attnres-train`: the hydra entry point (validate -> build -> train -> close).

    attnres-train                                                  # tiny model, bundled corpus
    attnres-train model.residual=standard                          # the baseline twin
    attnres-train model=kimi_linear_48b_a3b train.dry_run=true     # counts + plan.json, seconds

Reading order: `build_training` (everything a loop needs, shared with the profiler), `train` (the
loop, one screen), the loop's named steps below it (`Cadence`, `Throughput`, `Validation`,
`open_run`, `finish`), then `run` / `main`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import hydra
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from megatron.core import parallel_state as ps
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from attnres_train import checkpoint, cpu_compat
from attnres_train.config import ConfigError, register_configs, validate_config
from attnres_train.config.compose import CONFIG_DIR, check_overrides
from attnres_train.config.validate import validate_vocab
from attnres_train.data import build_datasets
from attnres_train.data.loader import MicroBatches
from attnres_train.data.tokenizer import BPETokenizer
from attnres_train.diagnostics import Diagnostics
from attnres_train.errors import CheckpointError, TrainingDiverged
from attnres_train.model.backend import Backend, record_backend, select_backend
from attnres_train.model.counting import count_parameters
from attnres_train.model.model import build_model
from attnres_train.optim import build_optimizer, build_scheduler, wrap_chunks
from attnres_train.plan import dry_run, single_process_parallel
from attnres_train.preempt import PreemptionSignal
from attnres_train.run_logger import RunLogger, device_peak_flops, model_flops_per_token
from attnres_train.step import all_finite, evaluate, model_state_tensors, train_step
from attnres_train.train_state import TrainState
from parallel.groups import destroy_distributed, init_distributed
from parallel.layout import StageLayout, layout_for
from parallel.pipeline import Pipeline

register_configs()


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


# -- build ---------------------------------------------------------------------------------------
@dataclass
class Training:
    """Everything a training loop needs on this rank (`build_training`)."""

    rank: int  # global rank
    dp: int  # data-parallel size
    dp_rank: int
    num_micro: int  # micro-batches per step on this rank: global batch / (micro batch x dp)
    dtype: torch.dtype  # parameter dtype
    train_ds: Dataset
    valid_ds: Dataset
    counts: dict  # count_parameters of the whole model: params_total, params_active, table
    state: TrainState  # this rank's model chunks, optimizer, LR schedule, step: what checkpoints hold
    layout: StageLayout  # which layers each pipeline chunk holds, and what the hops carry
    pipeline: Pipeline  # runs the DDP-wrapped chunks through megatron's schedules
    tokenizer: BPETokenizer  # the data's (saved into the run dir: exports and generation use it)


def build_training(cfg, *, train_samples: Optional[int] = None, scratch_dir: Optional[Path] = None) -> Training:
    """Everything a training loop needs, built the same way for `attnres-train` and the profiler:
    datasets, this rank's DDP-wrapped model chunks, optimizer, LR schedule, pipeline runtime.
    The order (seeds, data, model, optimizer) fixes the RNG draws: keep it."""
    t, m = cfg.train, cfg.model
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError("train.global_batch_size", t.global_batch_size,
                          f"must be divisible by train.micro_batch_size x data-parallel size = "
                          f"{t.micro_batch_size} x {dp} = {t.micro_batch_size * dp}")
    num_micro = t.global_batch_size // (t.micro_batch_size * dp)
    if cfg.parallel.vpp > 1 and num_micro % cfg.parallel.pp:
        # megatron's interleaved schedule walks micro-batches in groups of pp
        raise ConfigError("train.global_batch_size", t.global_batch_size,
                          f"with parallel.vpp>1 the micro-batches per step ({num_micro} = global / "
                          f"(micro x dp)) must be a multiple of parallel.pp={cfg.parallel.pp}")
    dtype = resolve_dtype(t.dtype)
    torch.manual_seed(t.seed)
    model_parallel_cuda_manual_seed(t.seed)

    train_ds, valid_ds, tokenizer = build_datasets(
        cfg.data, seq_length=m.seq_length, seed=t.seed,
        train_samples=train_samples or t.steps * t.global_batch_size, valid_samples=None)
    validate_vocab(m.vocab_size, tokenizer.vocab_size)

    counts = count_parameters(build_model(m, meta=True), m)  # the whole model, on the meta device
    model_chunks = build_chunks(m, cfg.parallel, dtype, layout_independent_init=t.layout_independent_init,
                                seed=t.seed, scratch_dir=scratch_dir)
    chunks = wrap_chunks(model_chunks)
    config = model_chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
    optimizer = build_optimizer(t, chunks, params_dtype=dtype)
    scheduler = build_scheduler(t, optimizer)
    layout = layout_for(m, cfg.parallel)
    pipeline = Pipeline(chunks, layout, seq_length=m.seq_length, micro_batch_size=t.micro_batch_size)
    return Training(rank=dist.get_rank(), dp=dp, dp_rank=dp_rank, num_micro=num_micro, dtype=dtype,
                    train_ds=train_ds, valid_ds=valid_ds, counts=counts,
                    state=TrainState(model_chunks, optimizer, scheduler), layout=layout, pipeline=pipeline,
                    tokenizer=tokenizer)


def build_chunks(model_cfg, parallel_cfg, dtype, *, layout_independent_init: bool = False, seed: int = 0,
                 scratch_dir: Optional[Path] = None) -> list:
    """This rank's model chunks: one per virtual pipeline stage."""
    init_dir = checkpoint.unsplit_init_dir(scratch_dir) if layout_independent_init else None
    if init_dir is not None:
        checkpoint.save_unsplit_init(model_cfg, parallel_cfg, dtype, seed, init_dir)
    vpp = parallel_cfg.vpp
    chunks = []
    for v in range(vpp):
        vp_stage = v if vpp > 1 else None
        chunk = build_model(model_cfg, parallel_cfg, params_dtype=dtype, vp_stage=vp_stage,
                            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage))
        chunks.append(chunk)
    if init_dir is not None:
        checkpoint.load_unsplit_init(chunks, init_dir)
    if torch.cuda.is_available():
        for chunk in chunks:
            chunk.cuda()
    return chunks


# -- the loop ------------------------------------------------------------------------------------
def train(cfg, run_dir: Path) -> dict:
    """Train to cfg.train.steps in run_dir, resuming per train.resume; returns summary.json's
    content, or {"steps", "preempted_at_step"} when a signal stopped the run early."""
    t, m = cfg.train, cfg.model
    init_from = checkpoint.init_from_checkpoint(t.init_from) if t.init_from else None  # before the build
    run = build_training(cfg, scratch_dir=run_dir)
    state, ckpt_root = run.state, run_dir / "checkpoints"
    log = print if run.rank == 0 else _silent
    resumed = checkpoint.resume(t.resume, ckpt_root, state, m, log=log, global_batch_size=t.global_batch_size,
                                seed=t.seed)
    if init_from is not None and resumed is None:
        checkpoint.init_weights(init_from, state, m, log=log)
    elif init_from is not None:
        log(f"train.init_from={t.init_from} not used: resuming this run from its step {state.step}")
    start = state.step
    if start >= t.steps:
        return nothing_to_train(run_dir, start, t.steps, verbose=run.rank == 0)
    backend = select_backend(m)  # every rank: a missing fast path raises here, not mid-step
    logger = open_run(cfg, run, run_dir, backend)
    meter = Throughput.for_run(cfg, run.counts)  # after the build: its CPU probe draws torch.randn
    batches = MicroBatches(run.train_ds, micro_batch_size=t.micro_batch_size, num_micro=run.num_micro,
                           dp_rank=run.dp_rank, dp_size=run.dp)
    valid_batches = MicroBatches(run.valid_ds, micro_batch_size=t.micro_batch_size, num_micro=0,
                                 dp_rank=run.dp_rank, dp_size=run.dp)
    diag = Diagnostics(state.model_chunks, run_dir) if cfg.logging.diag_interval and run.rank == 0 else None
    cadence = Cadence.for_run(cfg, start)
    logger.set_start(start)
    validation = Validation(run.pipeline, valid_batches.eval_batches(t.eval_batches))

    # SIGUSR1/SIGTERM (slurm time limit, preemption): checkpoint after the current step and return;
    # the previous handlers are back once the block is left.
    divergence = Divergence(cfg.train, ckpt_root)
    with PreemptionSignal() as preempt, closing_on_error(logger):
        for step in range(start, t.steps):
            out = timed_step(run, batches, step, meter, diag if cadence.draws_diagnostics(step + 1) else None)
            state.finish_step(t.global_batch_size)
            skipped = not out["update_ok"]  # a skipped update is always logged, with its reason
            record = step_record(out, state, meter) if cadence.logs(state.step) or skipped else {}
            if skipped:
                record["update_skipped"] = "non-finite loss or gradient"
            if cadence.evaluates(state.step):
                record["val_loss"] = validation()
            if record:
                logger.log(state.step, record)
            divergence.observe(state.step, out)  # raises after train.max_bad_steps bad steps in a row
            preempted = state.step < t.steps and preempt.requested()  # a collective: every rank, every step
            stop = preempted or cadence.exits(state.step)
            if cadence.saves(state.step) or stop:
                saved = save_if_good(ckpt_root, state, m, t, divergence, verbose=run.rank == 0)
            if stop:  # exit code 0; no summary.json (the run is not finished)
                if run.rank == 0:
                    why = preempt.reason if preempted else f"train.exit_interval={t.exit_interval}"
                    print(f"{'preempted' if preempted else 'stopped'} at step {state.step}/{t.steps} ({why}): "
                          f"checkpoint saved to {saved}; rerun the same command (same hydra.run.dir) to "
                          "resume", flush=True)
                logger.close()
                return {"steps": t.steps, "preempted_at_step": state.step}
    return finish(run_dir, cfg, run, validation, logger, backend)


# -- the loop's named steps ----------------------------------------------------------------------
@dataclass(frozen=True)
class Cadence:
    """Which steps log, evaluate, save a checkpoint and draw diagnostics. `done` counts finished
    steps (1-based); the last step does everything, and the first step of a (re)start logs."""

    total: int
    start: int  # the step training (re)starts after
    log_interval: int
    eval_interval: int  # 0: only at the end
    save_interval: int  # 0: only at the end
    diag_interval: int  # 0: never
    exit_interval: int = 0  # 0: never

    @classmethod
    def for_run(cls, cfg, start: int) -> "Cadence":
        return cls(total=cfg.train.steps, start=start, log_interval=cfg.logging.log_interval,
                   eval_interval=cfg.train.eval_interval, save_interval=cfg.train.save_interval,
                   diag_interval=cfg.logging.diag_interval, exit_interval=cfg.train.exit_interval)

    def logs(self, done: int) -> bool:
        return done % self.log_interval == 0 or done == self.total or done == self.start + 1

    def evaluates(self, done: int) -> bool:
        return bool(self.eval_interval and done % self.eval_interval == 0) or done == self.total

    def saves(self, done: int) -> bool:
        return bool(self.save_interval and done % self.save_interval == 0) or done == self.total

    def exits(self, done: int) -> bool:
        """Stop here (checkpointed) for train.exit_interval; never at the last step, which finishes."""
        return bool(self.exit_interval) and done % self.exit_interval == 0 and done < self.total

    def draws_diagnostics(self, done: int) -> bool:
        return bool(self.diag_interval) and (done % self.diag_interval == 0 or done == self.total)


@dataclass
class Throughput:
    """Step times since the last logged step -> tokens/s and MFU (model FLOPs per token x tokens,
    over the peak of every rank's device)."""

    tokens_per_step: int  # global batch x sequence length
    flops_per_token: float  # model_flops_per_token: 6 x non-embedding active params + attention
    peak_flops: float  # one device's
    world_size: int
    times: list = field(default_factory=list)

    @classmethod
    def for_run(cls, cfg, counts: dict) -> "Throughput":
        embed = counts["table"].get("embedding", (0, 0))[0]
        return cls(tokens_per_step=cfg.train.global_batch_size * cfg.model.seq_length,
                   flops_per_token=model_flops_per_token(cfg.model, counts["params_active"] - embed),
                   peak_flops=device_peak_flops(cfg.logging.peak_flops),  # CPU: a 0.2 s GEMM probe
                   world_size=dist.get_world_size())

    def add(self, step_time_s: float) -> None:
        self.times.append(step_time_s)

    def mfu(self, step_time_s: float) -> float:
        return self.flops_per_token * self.tokens_per_step / step_time_s / (self.peak_flops * self.world_size)

    def take(self, done: int) -> dict:
        """tokens, tokens_per_s, step_time_s, mfu over the steps since the last call."""
        dt = sum(self.times) / len(self.times)
        self.times = []
        return {"tokens": done * self.tokens_per_step, "tokens_per_s": self.tokens_per_step / dt,
                "step_time_s": dt, "mfu": self.mfu(dt)}


@dataclass
class Validation:
    """The validation loss over fixed micro-batches (collated once, reused every pass)."""

    pipeline: Pipeline
    batches: list
    last: Optional[float] = None
    best: float = float("inf")

    def __call__(self) -> float:
        self.last = evaluate(self.pipeline, self.batches)
        self.best = min(self.best, self.last)
        return self.last


class Divergence:
    """Counts consecutive steps whose update was skipped (non-finite loss or gradient on some rank)
    and stops the run after train.max_bad_steps of them; refuses to checkpoint a non-finite state.
    Every rank sees the same verdicts (train_step's all-reduce), so all stop at the same step."""

    def __init__(self, train_cfg, ckpt_root: Path):
        self.cfg, self.ckpt_root = train_cfg, ckpt_root
        self.bad: list = []  # (step, loss) of the current run of bad steps

    def observe(self, step: int, out: dict) -> None:
        if out["update_ok"]:
            self.bad = []
            return
        self.bad.append((step, out["loss"]))
        if len(self.bad) >= self.cfg.max_bad_steps:
            first, (last, loss) = self.bad[0][0], self.bad[-1]
            raise TrainingDiverged(
                f"training diverged at step {last}: {len(self.bad)} steps in a row ({first}-{last}) had a "
                f"non-finite loss or gradient (loss {loss}), their updates skipped "
                f"(train.max_bad_steps={self.cfg.max_bad_steps}). {self._last_good()} Try a new run (another "
                f"hydra.run.dir) with a lower train.lr (now {self.cfg.lr:g}), a longer train.warmup_steps (now "
                f"{self.cfg.warmup_steps}) or a smaller train.clip_grad (now {self.cfg.clip_grad:g})")

    @property
    def in_bad_run(self) -> bool:
        """The last step's update was skipped: the state gives a non-finite loss on real data."""
        return bool(self.bad)

    def check_checkpointable(self, state: TrainState) -> None:
        """A checkpoint is never written from non-finite parameters or optimizer moments."""
        if not all_finite(model_state_tensors(state.model_chunks, state.optimizer)):
            raise TrainingDiverged(
                f"step {state.step}: the parameters or optimizer moments are not finite, so no checkpoint "
                f"is written. {self._last_good()} Try a new run (another hydra.run.dir) with a lower train.lr "
                f"(now {self.cfg.lr:g}) or a smaller train.clip_grad (now {self.cfg.clip_grad:g})")

    def last_good(self) -> Optional[Path]:
        good = checkpoint.step_dirs(self.ckpt_root)
        return good[-1] if good else None

    def _last_good(self) -> str:
        good = self.last_good()
        if good is None:
            return "There is no checkpoint yet."
        return (f"The last good checkpoint is {good}; rerunning the same command resumes from it "
                "(train.resume=auto), its LR schedule included.")


def save_if_good(ckpt_root: Path, state: TrainState, model_cfg, train_cfg, divergence: Divergence, *,
                 verbose: bool) -> Optional[Path]:
    """Checkpoint `state`, unless it is suspect: inside a run of skipped updates (the weights gave a
    non-finite loss, so keep_last must not rotate out an older, good checkpoint for them) nothing
    is written and the newest existing checkpoint is returned; a non-finite state stops the run."""
    if divergence.in_bad_run:
        kept = divergence.last_good()
        if verbose:
            print(f"step {state.step}: no checkpoint (its update was skipped: a non-finite loss or gradient); "
                  f"the newest checkpoint stays {kept}", flush=True)
        return kept
    divergence.check_checkpointable(state)
    return checkpoint.save(ckpt_root, state, model_cfg=model_cfg, keep_last=train_cfg.keep_last,
                           global_batch_size=train_cfg.global_batch_size)


@contextlib.contextmanager
def closing_on_error(logger: RunLogger):
    """Close the run's logs (metrics, wandb, tensorboard) when the loop ends with an exception."""
    try:
        yield
    except BaseException:
        logger.close()
        raise


def timed_step(run: Training, batches: MicroBatches, step: int, meter: Throughput,
               diag: Optional[Diagnostics]) -> dict:
    """Train step `step` (0-based; its batches collated inside the timing), recording its time in
    `meter`; under `diag` (when given) its sublayer statistics too."""
    if diag is not None:
        diag.start()
    tic = time.perf_counter()
    out = train_step(run.pipeline, run.state.optimizer, run.state.scheduler,
                     batches.at(run.state.consumed_samples))
    meter.add(time.perf_counter() - tic)
    if diag is not None:
        diag.finish(step + 1)
    return out


def step_record(out: dict, state: TrainState, meter: Throughput) -> dict:
    """The metrics.jsonl record of the step just finished (keys in the order they are written)."""
    return {"loss": out["loss"], "lr": state.optimizer.param_groups[0]["lr"], "grad_norm": out["grad_norm"],
            "consumed_samples": state.consumed_samples, **meter.take(state.step)}


def open_run(cfg, run: Training, run_dir: Path, backend: Backend) -> RunLogger:
    """The run's logger (metrics.jsonl, tensorboard, wandb; written by rank 0), its config.yaml and
    the start-up lines."""
    m, start = cfg.model, run.state.step
    ran = record_backend(cfg, backend)  # the config with every "auto" backend choice resolved
    resolved = OmegaConf.to_container(OmegaConf.structured(ran), resolve=True, enum_to_str=True)
    logger = RunLogger(run_dir, cfg, total_steps=cfg.train.steps, enabled=run.rank == 0, resolved_config=resolved)
    if run.rank == 0:
        write_run_config(run_dir, ran)
        run.tokenizer.save(run_dir / checkpoint.RUN_TOKENIZER)
        print(f"model {m.name} residual={m.residual}: {run.counts['params_total']:,} params "
              f"({run.counts['params_active']:,} active); {len(run.train_ds):,} train / {len(run.valid_ds):,} "
              f"valid samples of {m.seq_length} tokens; run dir {run_dir}"
              + (f"; resumed from step {start}" if start else ""), flush=True)
        print(backend.describe(), flush=True)
    return logger


def write_run_config(run_dir: Path, cfg) -> None:
    """config.yaml: the config the run trains with, its backend choices as resolved (record_backend)."""
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def nothing_to_train(run_dir: Path, start: int, steps: int, *, verbose: bool) -> dict:
    """The run dir's checkpoint is already at or past train.steps: say so, return its summary."""
    if verbose:
        print(f"{run_dir} already holds a checkpoint at step {start} >= train.steps={steps}: nothing "
              "to train. Raise train.steps to continue it, or pick a new hydra.run.dir.")
    summary = run_dir / "summary.json"
    return json.loads(summary.read_text()) if summary.exists() else {}


def finish(run_dir: Path, cfg, run: Training, validation: Validation, logger: RunLogger, backend: Backend) -> dict:
    """summary.json (rank 0 writes it): final and best validation loss, sizes, peak memory, the
    median logged tokens/s, a hash of the weights, and the backend that ran (with the reasons)."""
    counts = run.counts
    summary = {"steps": cfg.train.steps, "final_val_loss": validation.last, "best_val_loss": validation.best,
               "params_total": counts["params_total"], "params_active": counts["params_active"],
               "peak_memory_bytes": peak_memory_bytes(), "weights_sha256": weights_sha256(run.state.model_chunks),
               "backend": backend.as_dict()}
    if run.rank == 0:
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        speeds = [r["tokens_per_s"] for r in metrics if "tokens_per_s" in r]
        summary["tokens_per_s"] = sorted(speeds)[len(speeds) // 2] if speeds else None
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"done: final val_loss {validation.last:.4f} (best {validation.best:.4f}); "
              f"summary in {run_dir / 'summary.json'}")
    logger.close()
    return summary


def _silent(*_) -> None:
    """The log function of ranks other than 0."""


def weights_sha256(model_chunks: list) -> str:
    """Hash of this rank's parameters (bitwise): resume tests compare it with an unbroken run."""
    h = hashlib.sha256()
    params = [(n, p) for chunk in model_chunks for n, p in chunk.named_parameters()]
    for name, p in params:
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- the process ---------------------------------------------------------------------------------
@contextlib.contextmanager
def prepared_process(cfg):
    """Validate `cfg`, prepare this process (quiet logs, the CPU patches) and hold its process
    groups for the block: `attnres-train` and the profiler's workers start the same way."""
    validate_config(cfg)
    cpu_compat.apply()
    # a dry run plans any layout in one process: the plan reads the sizes from cfg.parallel
    init_distributed(single_process_parallel(cfg.parallel) if cfg.train.dry_run else cfg.parallel)
    try:
        yield
    finally:
        destroy_distributed()


def run(cfg, run_dir: Path):
    with prepared_process(cfg):
        if cfg.train.dry_run:
            return dry_run(cfg, run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            return train(cfg, run_dir)
        except TrainingDiverged as exc:
            # every rank stops at this same step (train_step's all-reduce): rank 0 says why while the
            # others wait, so that torchrun, seeing a rank exit, does not kill rank 0 before it printed
            if dist.get_rank() == 0:
                print(f"attnres-train: error: {exc}", file=sys.stderr, flush=True)
            dist.barrier()
            raise SystemExit(1) from None


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    typed = OmegaConf.to_object(cfg)  # dataclass instances, validated types
    try:
        run(typed, Path(HydraConfig.get().runtime.output_dir))
    except ConfigError as exc:  # a user mistake: one clear line, no traceback
        print(f"attnres-train: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    except CheckpointError as exc:  # on every rank that has it: the reason may be one rank's own
        print(f"attnres-train: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)


def main() -> None:
    try:  # a value the schema refuses: one line naming the key and the allowed values, not hydra's report
        check_overrides(sys.argv[1:])
    except ConfigError as exc:
        print(f"attnres-train: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
