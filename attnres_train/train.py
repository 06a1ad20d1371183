"""`attnres-train`: the hydra entry point (validate -> build -> train -> close).

    attnres-train                                                  # tiny model, bundled corpus
    attnres-train model.residual=standard                          # the baseline twin
    attnres-train model=kimi_linear_48b_a3b train.dry_run=true     # counts + plan.json, seconds
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from attnres_train import cpu_compat
from attnres_train.config import ConfigError, register_configs, validate_config

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")

register_configs()


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def build_training(cfg, *, train_samples: Optional[int] = None, scratch_dir: Optional[Path] = None) -> SimpleNamespace:
    """Everything a training loop needs, built the same way for `attnres-train` and the profiler:
    datasets, this rank's DDP-wrapped model chunks, optimizer, LR schedule, pipeline runtime."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from attnres_train.config.validate import validate_vocab
    from attnres_train.data import build_datasets
    from attnres_train.model.counting import count_parameters
    from attnres_train.model.model import build_model
    from attnres_train.optim import build_optimizer, build_scheduler
    from parallel.layout import layout_for
    from parallel.pipeline import Pipeline

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
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=dp > 1)
    chunks = [DistributedDataParallel(c.config, ddp_config, c) for c in model_chunks]
    config = model_chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
    optimizer = build_optimizer(t, chunks, params_dtype=dtype, dp_size=dp)
    scheduler = build_scheduler(t, optimizer)
    layout = layout_for(m, cfg.parallel)
    pipeline = Pipeline(chunks, layout, seq_length=m.seq_length, micro_batch_size=t.micro_batch_size)
    return SimpleNamespace(rank=dist.get_rank(), dp=dp, dp_rank=dp_rank, num_micro=num_micro, dtype=dtype,
                           train_ds=train_ds, valid_ds=valid_ds, counts=counts, model_chunks=model_chunks,
                           chunks=chunks, optimizer=optimizer, scheduler=scheduler, layout=layout,
                           pipeline=pipeline)


def train(cfg, run_dir: Path) -> dict:
    import torch.distributed as dist

    from attnres_train import checkpoint
    from attnres_train.data.loader import MicroBatches
    from attnres_train.diagnostics import Diagnostics
    from attnres_train.logging import RunLogger, device_peak_flops, model_flops_per_token
    from attnres_train.step import evaluate, train_step

    t, m = cfg.train, cfg.model
    run = build_training(cfg, scratch_dir=run_dir)
    rank, dp, dp_rank, num_micro = run.rank, run.dp, run.dp_rank, run.num_micro
    train_ds, valid_ds, counts = run.train_ds, run.valid_ds, run.counts
    model_chunks, chunks, optimizer, scheduler = run.model_chunks, run.chunks, run.optimizer, run.scheduler
    pipeline = run.pipeline

    ckpt_root = run_dir / "checkpoints"
    meta = None
    if t.resume == "auto":
        meta = checkpoint.load_latest(ckpt_root, chunks, optimizer, scheduler, m,
                                      log=print if rank == 0 else (lambda *_: None))
    elif t.resume != "none":
        meta = checkpoint.load(Path(t.resume), chunks, optimizer, scheduler, m)
    start = meta["step"] if meta else 0
    if start >= t.steps:
        if rank == 0:
            print(f"{run_dir} already holds a checkpoint at step {start} >= train.steps={t.steps}: nothing "
                  "to train. Raise train.steps to continue it, or pick a new hydra.run.dir.")
        return json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}

    from attnres_train.model.backend import select_backend

    backend = select_backend(m)  # every rank: a missing fast path raises here, not mid-step
    resolved = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    logger = RunLogger(run_dir, cfg, total_steps=t.steps, enabled=rank == 0, resolved_config=resolved)
    if rank == 0:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        print(f"model {m.name} residual={m.residual}: {counts['params_total']:,} params "
              f"({counts['params_active']:,} active); {len(train_ds):,} train / {len(valid_ds):,} valid "
              f"samples of {m.seq_length} tokens; run dir {run_dir}"
              + (f"; resumed from step {start}" if start else ""), flush=True)
        print(backend.describe(), flush=True)
    embed = counts["table"].get("embedding", (0, 0))[0]
    flops_per_token = model_flops_per_token(m, counts["params_active"] - embed)
    peak = device_peak_flops()
    batches = MicroBatches(train_ds, micro_batch_size=t.micro_batch_size, num_micro=num_micro,
                           dp_rank=dp_rank, dp_size=dp)
    valid_batches = MicroBatches(valid_ds, micro_batch_size=t.micro_batch_size, num_micro=0,
                                 dp_rank=dp_rank, dp_size=dp)
    tokens_per_step = t.global_batch_size * m.seq_length
    diag = Diagnostics(model_chunks, run_dir) if cfg.logging.diag_interval and rank == 0 else None
    logger.set_start(start)
    val_loss, best_val, step_times = None, float("inf"), []

    eval_batches = valid_batches.eval_batches(t.eval_batches)  # collated once, reused every pass

    def run_eval() -> float:
        return evaluate(pipeline, eval_batches)

    from attnres_train.preempt import PreemptionSignal

    # SIGUSR1/SIGTERM (slurm time limit, preemption): checkpoint after the current step and return.
    # Handlers are restored on return; an exception ends the process anyway.
    preempt = PreemptionSignal()
    for step in range(start, t.steps):
        done = step + 1
        diag_step = diag is not None and (done % cfg.logging.diag_interval == 0 or done == t.steps)
        if diag_step:
            diag.start()
        tic = time.perf_counter()
        out = train_step(pipeline, optimizer, scheduler, batches.for_step(step))
        step_times.append(time.perf_counter() - tic)
        if diag_step:
            diag.finish(done)
        record = {}
        if done % cfg.logging.log_interval == 0 or done == t.steps or done == start + 1:
            dt = sum(step_times) / len(step_times)
            step_times = []
            record.update(loss=out["loss"], lr=optimizer.param_groups[0]["lr"], grad_norm=out["grad_norm"],
                          tokens=done * tokens_per_step, tokens_per_s=tokens_per_step / dt, step_time_s=dt,
                          mfu=flops_per_token * tokens_per_step / dt / (peak * dist.get_world_size()))
        if (t.eval_interval and done % t.eval_interval == 0) or done == t.steps:
            val_loss = run_eval()
            best_val = min(best_val, val_loss)
            record["val_loss"] = val_loss
        if record:
            logger.log(done, record)
        stop = done < t.steps and preempt.requested()  # a collective: every rank, every step
        if (t.save_interval and done % t.save_interval == 0) or done == t.steps or stop:
            saved = checkpoint.save(ckpt_root, done, chunks, optimizer, scheduler, model_cfg=m,
                                    consumed_samples=done * t.global_batch_size, keep_last=t.keep_last)
        if stop:  # exit code 0; no summary.json (the run is not finished)
            if rank == 0:
                print(f"preempted at step {done}/{t.steps} ({preempt.reason}): checkpoint saved to {saved}; "
                      "resubmit the same command (same hydra.run.dir) to resume", flush=True)
            preempt.close()
            logger.close()
            return {"steps": t.steps, "preempted_at_step": done}
    preempt.close()
    summary = {"steps": t.steps, "final_val_loss": val_loss, "best_val_loss": best_val,
               "params_total": counts["params_total"], "params_active": counts["params_active"],
               "peak_memory_bytes": peak_memory_bytes(), "weights_sha256": weights_sha256(model_chunks)}
    if rank == 0:
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        speeds = [r["tokens_per_s"] for r in metrics if "tokens_per_s" in r]
        summary["tokens_per_s"] = sorted(speeds)[len(speeds) // 2] if speeds else None
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"done: final val_loss {val_loss:.4f} (best {best_val:.4f}); summary in {run_dir / 'summary.json'}")
    logger.close()
    return summary


def build_chunks(model_cfg, parallel_cfg, dtype, *, layout_independent_init: bool = False, seed: int = 0,
                 scratch_dir: Optional[Path] = None) -> list:
    """This rank's model chunks: one per virtual pipeline stage."""
    from megatron.core import parallel_state as ps

    from attnres_train.model.model import build_model

    init_dir = _unsplit_init_dir(scratch_dir) if layout_independent_init else None
    if init_dir is not None:
        save_unsplit_init(model_cfg, parallel_cfg, dtype, seed, init_dir)
    vpp = parallel_cfg.vpp
    chunks = []
    for v in range(vpp):
        vp_stage = v if vpp > 1 else None
        chunk = build_model(model_cfg, parallel_cfg, params_dtype=dtype, vp_stage=vp_stage,
                            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage))
        chunks.append(chunk)
    if init_dir is not None:
        load_unsplit_init(chunks, init_dir)
    if torch.cuda.is_available():
        for chunk in chunks:
            chunk.cuda()
    return chunks


def _unsplit_init_dir(scratch_dir: Optional[Path]) -> Path:
    """One directory every rank agrees on: under the run dir (shared by the nodes, like the
    checkpoints), or a temporary one made by rank 0 (single node)."""
    import tempfile

    import torch.distributed as dist

    path = [str(Path(scratch_dir) / ".unsplit-init") if scratch_dir else
            (tempfile.mkdtemp(prefix="attnres-init-") if dist.get_rank() == 0 else None)]
    dist.broadcast_object_list(path, src=0)
    return Path(path[0])


def save_unsplit_init(model_cfg, parallel_cfg, dtype, seed: int, path: Path) -> None:
    """The unsplit model's initial weights (what one process gets from `seed`) as a megatron
    distributed checkpoint, so that any TP/PP/EP layout can start from them: dist_checkpointing
    reshards (TP slices, expert ranges, pipeline layer ranges), which a name mapping cannot.
    Every rank builds the whole model under TP=PP=EP=1 groups; the run's groups are restored after."""
    import shutil

    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from attnres_train.config.schema import ParallelConfig
    from attnres_train.model.model import build_model
    from parallel.groups import init_model_parallel

    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    dist.barrier()
    ps.destroy_model_parallel()
    init_model_parallel(ParallelConfig())
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    reference = build_model(model_cfg, params_dtype=dtype)
    dist_checkpointing.save({"model": reference.sharded_state_dict()}, str(path), sharded_strategy=("torch_dist", 1))
    del reference
    ps.destroy_model_parallel()
    init_model_parallel(parallel_cfg)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def load_unsplit_init(chunks: list, path: Path) -> None:
    """Load each chunk's shard of save_unsplit_init's checkpoint, then remove it."""
    import shutil

    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    for chunk in chunks:
        state = dist_checkpointing.load({"model": chunk.sharded_state_dict()}, str(path),
                                        sharded_strategy=("torch_dist", 1))
        result = chunk.load_state_dict(state["model"], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"unsplit init: missing {missing}, unexpected {result.unexpected_keys}")
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)


def weights_sha256(model_chunks: list) -> str:
    """Hash of this rank's parameters (bitwise): resume tests compare it with an unbroken run."""
    import hashlib

    h = hashlib.sha256()
    params = [(n, p) for chunk in model_chunks for n, p in chunk.named_parameters()]
    for name, p in params:
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def quiet_third_party() -> None:
    """megatron logs every bucket's parameter list and its config at INFO, and warns at import
    about optional packages (TE, Apex) whose absence the CPU path expects."""
    logging.getLogger("megatron").setLevel(logging.WARNING)
    for pattern in (r".*(Transformer Engine|Apex).* not installed.*", r".*full scope is deprecated.*",
                    r".*ShardedTensor.*", r".*`load_state_dict` is deprecated.*"):
        warnings.filterwarnings("ignore", message=pattern)


def run(cfg, run_dir: Path):
    validate_config(cfg)
    quiet_third_party()
    cpu_compat.apply()
    from parallel.groups import destroy_distributed, init_distributed

    if cfg.train.dry_run:  # one process plans any layout: the plan reads the sizes from cfg.parallel
        from attnres_train.plan import single_process_parallel

        init_distributed(single_process_parallel(cfg.parallel))
    else:
        init_distributed(cfg.parallel)
    try:
        if cfg.train.dry_run:
            from attnres_train.plan import dry_run

            return dry_run(cfg, run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        return train(cfg, run_dir)
    finally:
        destroy_distributed()


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    typed = OmegaConf.to_object(cfg)  # dataclass instances, validated types
    try:
        run(typed, Path(HydraConfig.get().runtime.output_dir))
    except ConfigError as exc:  # a user mistake: one clear line, no traceback
        print(f"attnres-train: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


def main() -> None:
    if not torch.cuda.is_available():
        # Before any megatron import: its jit_fuser (torch.compile) is slower than eager on CPU.
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    _hydra_main()


if __name__ == "__main__":
    main()
