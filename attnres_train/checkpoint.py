"""Distributed checkpoints (megatron dist_checkpointing, torch_dist format), saved atomically.

Layout: <run_dir>/checkpoints/step_0000100/ holding megatron's shards plus `meta.json` (step,
consumed samples, model config). A save writes into `.tmp-step_…` and is renamed only once every
rank has finished, so a run killed mid-save keeps its previous checkpoint. Resume takes the
newest complete checkpoint; if it fails to load, the error names it and the previous one is tried.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from attnres_train.config.validate import ConfigError

META = "meta.json"
# Model config keys that change parameter shapes: a checkpoint cannot be resumed across them.
SHAPE_KEYS = ("residual", "num_layers", "layer_pattern", "hidden_size", "vocab_size", "kda", "mla", "moe")


class CheckpointError(RuntimeError):
    pass


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dirs(ckpt_root: Path) -> list:
    """Complete checkpoints (those with meta.json), oldest first."""
    if not ckpt_root.is_dir():
        return []
    dirs = [p for p in ckpt_root.glob("step_*") if (p / META).is_file()]
    return sorted(dirs, key=lambda p: int(p.name.split("_")[1]))


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_state(model_chunks, optimizer, scheduler, *, is_loading: bool) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = {}
    model_sd = {}
    for i, chunk in enumerate(model_chunks):
        model_sd[f"model{i}"] = chunk.module.sharded_state_dict()  # unwrapped: no "module." prefix
    state.update(model_sd)
    state["optimizer"] = optimizer.sharded_state_dict(
        model_sd if len(model_chunks) > 1 else model_sd["model0"], is_loading=is_loading,
        metadata={"distrib_optim_sharding_type": "dp_reshardable"},
    )
    state["scheduler"] = scheduler.state_dict()
    world, rank = (dist.get_world_size(), _rank()) if dist.is_initialized() else (1, 0)
    state["rng"] = ShardedObject("rng_state", _rng_state(), (world,), (rank,), replica_id=0)
    return state


def save(ckpt_root: Path, step: int, model_chunks, optimizer, scheduler, *, consumed_samples: int,
         model_cfg, keep_last: int) -> Path:
    from megatron.core import dist_checkpointing

    final = ckpt_root / f"step_{step:07d}"
    tmp = ckpt_root / f".tmp-step_{step:07d}"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    state = _sharded_state(model_chunks, optimizer, scheduler, is_loading=False)
    dist_checkpointing.save(state, str(tmp), sharded_strategy=("torch_dist", 1))
    _barrier()
    if _rank() == 0:
        meta = {"step": step, "consumed_samples": consumed_samples,
                "model": dataclasses.asdict(model_cfg)}
        (tmp / META).write_text(json.dumps(meta, indent=2))
        if final.exists():  # an older save of the same step (e.g. after a fallback): replace it
            shutil.rmtree(final)
        tmp.rename(final)
        for old in step_dirs(ckpt_root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def check_compatible(meta: dict, model_cfg, where: Path) -> None:
    saved = meta["model"]
    current = dataclasses.asdict(model_cfg)
    diffs = [k for k in SHAPE_KEYS if saved.get(k) != current.get(k)]
    if diffs:
        detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in diffs)
        raise ConfigError(
            f"model.{diffs[0]}", current.get(diffs[0]),
            f"checkpoint {where} was saved with a different model shape ({detail}). Resume with the "
            "same model config, or start a new run (train.resume=none and a new hydra.run.dir)",
        )


def load_latest(ckpt_root: Path, model_chunks, optimizer, scheduler, model_cfg, *, log=print):
    """Load the newest loadable checkpoint under ckpt_root (falling back to older ones).

    Returns its meta dict, or None when there is no checkpoint.
    """
    candidates = step_dirs(ckpt_root)
    for bad in sorted(ckpt_root.glob(".tmp-step_*")) if ckpt_root.is_dir() else []:
        log(f"ignoring incomplete checkpoint {bad} (the run stopped while saving it)")
    errors = []
    for path in reversed(candidates):
        try:
            return load(path, model_chunks, optimizer, scheduler, model_cfg)
        except (ConfigError, KeyboardInterrupt, SystemExit):
            raise
        # torch.distributed.checkpoint's CheckpointException derives from BaseException
        except BaseException as exc:  # corrupt or incomplete: name it and try the previous one
            errors.append(f"{path}: {type(exc).__name__}: {exc}")
            log(f"checkpoint {path} cannot be loaded ({type(exc).__name__}: {str(exc)[:200]}); "
                "falling back to the previous checkpoint")
    if errors:
        raise CheckpointError("no loadable checkpoint under " + str(ckpt_root) + ":\n" + "\n".join(errors))
    return None


def load(path: Path, model_chunks, optimizer, scheduler, model_cfg) -> dict:
    from megatron.core import dist_checkpointing

    meta_file = path / META
    if not meta_file.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {META} is missing")
    meta = json.loads(meta_file.read_text())
    check_compatible(meta, model_cfg, path)
    template = _sharded_state(model_chunks, optimizer, scheduler, is_loading=True)
    state = dist_checkpointing.load(template, str(path), sharded_strategy=("torch_dist", 1))
    for i, chunk in enumerate(model_chunks):
        chunk.module.load_state_dict(state[f"model{i}"])
    with torch.no_grad():  # distrib optimizer copies into views of leaf params
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return meta
