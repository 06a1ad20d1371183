"""Distributed checkpoints (megatron dist_checkpointing, torch_dist format), saved atomically.

Layout: <run_dir>/checkpoints/step_0000100/ holding megatron's shards plus `meta.json` (step,
consumed samples, model config). A save writes into `.tmp-step_…` and is renamed only once every
rank has finished and its files are fsynced, so a run killed mid-save (or a power loss) keeps its
previous checkpoint; old checkpoints are rotated out only after that. A save that fails (disk full,
no permission) removes its tmp dir and raises CheckpointSaveError on every rank. Resume takes the
newest complete checkpoint; if it fails to load, the error names it and the previous one is tried.

What is saved is a `TrainState` (model chunks, optimizer, LR schedule, step, consumed samples) plus
the RNG streams. Everything is keyed by what it is, not by the rank that held it, so a checkpoint
resumes on another layout (TP, PP, VPP, EP, DP): megatron reshards the weights and the optimizer's
model-space moments; the RNG streams are keyed by model-parallel coordinates (pp, tp, ep ranks),
which every data-parallel replica shares, so they are restored when only DP changes and re-seeded
from train.seed and the step otherwise; the data position is in samples, which holds across DP
sizes while the global batch is unchanged (a changed one is refused). meta.json records the layout,
so a load that fails on a changed layout is reported as such, never as a corrupt checkpoint.

The unsplit initial weights (`train.layout_independent_init`) use the same format: see
save_unsplit_init.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
from torch.distributed.checkpoint import CheckpointException

from attnres_train.config.schema import ParallelConfig
from attnres_train.errors import CheckpointError, CheckpointSaveError, ConfigError
from attnres_train.model.model import build_model
from attnres_train.optim import allocate_adam_state, untie_adam_steps
from attnres_train.train_state import TrainState
from parallel.groups import barrier, global_rank, init_model_parallel, is_distributed

META = "meta.json"
# Model config keys that change parameter shapes: a checkpoint cannot be resumed across them.
RUN_TOKENIZER = "tokenizer.json"  # in the run dir: the tokenizer the run trains with (exports ship it)
SHAPE_KEYS = ("residual", "num_layers", "layer_pattern", "hidden_size", "vocab_size", "kda", "mla", "moe")
# fields of those groups a resumed or initialised run may change: kernels and training behaviour
TRAINING_KNOBS = {"kda": ("chunk_size", "impl"), "moe": ("bias_update_rate", "aux_loss_coeff")}
STRATEGY = ("torch_dist", 1)
LAYOUT_KEYS = ("world", "tp", "pp", "vpp", "ep", "dp")
# the layout axes the RNG streams differ along (megatron seeds its trackers per tp and ep rank, and
# stages draw different numbers); data-parallel replicas share them
RNG_AXES = ("pp", "tp", "ep")
# an OSError as str() writes it, quoted in another exception's message
_ERRNO_TEXT = re.compile(r"\[Errno \d+\][^\n]*")


def step_dirs(ckpt_root: Path) -> list:
    """Complete checkpoints (those with meta.json), oldest first."""
    if not ckpt_root.is_dir():
        return []
    dirs = [p for p in ckpt_root.glob("step_*") if (p / META).is_file()]
    return sorted(dirs, key=lambda p: int(p.name.split("_")[1]))


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def current_layout() -> dict:
    """This job's parallel layout, as meta.json records it."""
    return {"world": dist.get_world_size() if dist.is_initialized() else 1,
            "tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "vpp": ps.get_virtual_pipeline_model_parallel_world_size() or 1,
            "ep": ps.get_expert_model_parallel_world_size(), "dp": ps.get_data_parallel_world_size()}


def describe_layout(layout: dict) -> str:
    return " ".join(f"{k}={layout[k]}" for k in LAYOUT_KEYS if k in layout)


def _rng_object(value) -> ShardedObject:
    """The RNG streams as one object per model-parallel position (pp, tp, ep ranks): the
    data-parallel replicas of a position draw the same numbers, so the lowest-ranked one saves it,
    and a job with another DP size restores it on each of its replicas."""
    sizes = tuple(current_layout()[k] for k in RNG_AXES)
    position = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
                ps.get_expert_model_parallel_rank())
    positions = [position]
    if is_distributed():
        positions = [None] * dist.get_world_size()
        dist.all_gather_object(positions, position)
    replica = positions[:global_rank()].count(position)
    return ShardedObject("rng_state", value, sizes, position, replica_id=replica)


def _sharded_state(state: TrainState, *, is_loading: bool, with_rng: bool = True) -> dict:
    """The sharded dict megatron saves: model{i} per chunk, optimizer (megatron's model-space
    format, `fully_reshardable`: each moment shaped and sharded like its parameter), scheduler and,
    unless `with_rng` is False (a load whose RNG streams cannot map), the RNG streams."""
    model_sd = {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(state.model_chunks)}
    sharded = dict(model_sd)
    if is_loading:
        allocate_adam_state(state.optimizer)
    sharded["optimizer"] = state.optimizer.sharded_state_dict(
        model_sd if len(state.model_chunks) > 1 else model_sd["model0"], is_loading=is_loading,
        metadata={"distrib_optim_sharding_type": "fully_reshardable"},
    )
    sharded["scheduler"] = state.scheduler.state_dict()
    if with_rng:
        sharded["rng"] = _rng_object(_rng_state())
    return sharded


def save(ckpt_root: Path, state: TrainState, *, model_cfg, keep_last: int,
         global_batch_size: Optional[int] = None) -> Path:
    """Save `state` as <ckpt_root>/step_<state.step>; keep the newest `keep_last` (0: all).
    A collective: every rank calls it.

    Durable and atomic: the shards go to `.tmp-step_…`, whose files and directory are fsynced
    before the rename to `step_…` (then the parent is fsynced); only then are old checkpoints
    rotated out and stale `.tmp-step_*` dirs of killed runs removed. A failure on any rank (an
    OSError: disk full, no permission) removes the tmp dir, leaves every older checkpoint as it
    was and raises CheckpointSaveError on every rank (none is left waiting in a collective)."""
    final = ckpt_root / f"step_{state.step:07d}"
    tmp = ckpt_root / f".tmp-step_{state.step:07d}"
    rank0 = global_rank() == 0
    meta = {"step": state.step, "consumed_samples": state.consumed_samples,
            "global_batch_size": global_batch_size, "layout": current_layout(),
            "model": dataclasses.asdict(model_cfg)}
    # each phase ends in an agreement (an all-gather), where the barriers were: every rank learns
    # whether some rank failed, and all raise together
    _agree(final, tmp, _attempt(_prepare_tmp, tmp) if rank0 else None)
    sharded = _sharded_state(state, is_loading=False)
    _agree(final, tmp, _attempt(dist_checkpointing.save, sharded, str(tmp), sharded_strategy=_save_strategy()))
    _agree(final, tmp, _attempt(_commit, tmp, final, meta, keep_last) if rank0 else None)
    return final


def _save_strategy():
    """megatron's torch_dist writer, its work spread over the data-parallel ranks (Megatron-LM's
    fully parallel save): the replicas of a tensor (weights and, gathered by the model-space
    optimizer format, Adam moments) are each written by one rank of the group, not all by DP rank 0."""
    base = get_default_save_sharded_strategy(*STRATEGY)
    if not is_distributed() or ps.get_data_parallel_world_size(with_context_parallel=True) == 1:
        return base
    return FullyParallelSaveStrategyWrapper(base, ps.get_data_parallel_group(with_context_parallel=True))


def _attempt(fn, *args, **kwargs) -> Optional[str]:
    """Run one phase of a save on this rank: None if it succeeded, else what failed (one line).
    Only I/O failures are caught (OSError; torch.distributed.checkpoint's CheckpointException,
    which wraps a write error of any rank); anything else is a bug and keeps its traceback."""
    try:
        fn(*args, **kwargs)
        return None
    except (OSError, CheckpointException) as exc:
        return _describe(exc)


def _describe(exc: BaseException) -> str:
    """The OS error behind a save failure, e.g. "[Errno 28] No space left on device: '<file>'".
    It may sit inside torch's CheckpointException (its failures: each failed rank's wrapped
    exception, named "rank r: …"), and there only as text: megatron's writer re-raises its worker's
    OSError as RuntimeError("Worker failure: <the OSError>"), and the gather to the coordinator
    pickles that, which drops the __cause__."""
    todo, seen = [("", exc)], set()
    while todo:
        where, e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return where + str(e)
        if isinstance(e, CheckpointException):
            todo += [(f"rank {rank}: ", wrapped[0]) for rank, wrapped in sorted(e.failures.items())]
        else:
            quoted = _ERRNO_TEXT.search(str(e))
            if quoted:
                return where + quoted.group(0)
        todo += [(where, e.__cause__), (where, e.__context__)]
    text = str(exc).splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _agree(final: Path, tmp: Path, failure: Optional[str]) -> None:
    """A collective: every rank passes what failed on it (None: nothing) and, if any rank failed,
    all of them raise the same CheckpointSaveError once rank 0 has removed the tmp dir. The default
    group serves (gloo on CPU, nccl on GPU: all_gather_object works on both), so no extra group."""
    if is_distributed():
        failures = [None] * dist.get_world_size()
        dist.all_gather_object(failures, failure)
    else:
        failures = [failure]
    failed = [(rank, f) for rank, f in enumerate(failures) if f is not None]
    if not failed:
        return
    if global_rank() == 0:  # every rank has stopped writing: nothing more lands in the tmp dir
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()  # the tmp dir is gone before any rank reads what is left
    # an OS error's text beats a rank that only learnt that another rank failed
    rank, reason = next(((r, f) for r, f in failed if "Errno" in f), failed[0])
    if len(failures) == 1:  # one process: no rank to name
        reason = reason.removeprefix("rank 0: ")
    elif not reason.startswith("rank "):
        reason = f"rank {rank}: {reason}"
    raise CheckpointSaveError(final, reason, _save_fix(final.parent))


def _save_fix(ckpt_root: Path) -> str:
    """What to do after a failed save: the checkpoint the same command resumes from."""
    try:
        kept = step_dirs(ckpt_root)
    except OSError:  # the directory itself is unreadable
        kept = []
    where = (f"resume from step {int(kept[-1].name.split('_')[1])} ({kept[-1]} is intact)" if kept
             else "start again (no checkpoint was saved yet)")
    anchor = ckpt_root if ckpt_root.is_dir() else ckpt_root.parent
    return f"Free space or fix the permissions on {anchor}, then rerun the same command to {where}"


def _prepare_tmp(tmp: Path) -> None:
    """An empty tmp dir for this save (rank 0); a new checkpoints dir is fsynced into its parent."""
    ckpt_root = tmp.parent
    new_root = not ckpt_root.is_dir()
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if new_root:
        _fsync_dir(ckpt_root.parent)


def _commit(tmp: Path, final: Path, meta: dict, keep_last: int) -> None:
    """Rank 0, once every rank's shards are written: meta.json, fsync, rename, fsync, then rotate.

    fsync order: every file of the tmp dir and the dir itself, so that the rename never publishes
    a checkpoint whose contents are not on disk yet; the parent after the rename, so that the
    rename survives a power loss before an older checkpoint is deleted. Rank 0 fsyncs the whole dir:
    megatron's writer already fsyncs each shard on the rank that wrote it (what counts on a shared
    file system), and fsyncing an already clean file is cheap, so one rank covers the rest
    (common.pt, metadata.json, meta.json) without knowing who wrote what."""
    ckpt_root = tmp.parent
    (tmp / META).write_text(json.dumps(meta, indent=2))
    for path in sorted(tmp.rglob("*")):
        if path.is_file():
            _fsync_file(path)
    _fsync_dir(tmp)
    if final.exists():  # an older save of the same step (e.g. after a fallback): replace it
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync_dir(ckpt_root)
    for old in step_dirs(ckpt_root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_root.glob(".tmp-step_*"):  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """fsync a directory (its entries: a rename, a new file). Some file systems cannot (EINVAL):
    there the rename is as durable as they make it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def _model_fields(model: dict) -> dict:
    """A model config dict without the fields that only steer training or kernels (TRAINING_KNOBS)."""
    return {k: ({f: x for f, x in v.items() if f not in TRAINING_KNOBS.get(k, ())} if isinstance(v, dict) else v)
            for k, v in model.items()}


def shape_diffs(meta: dict, model_cfg) -> tuple:
    """(the SHAPE_KEYS whose values differ between a checkpoint's meta.json and `model_cfg`, a
    "key: checkpoint X vs now Y; ..." description of them)."""
    saved, current = (_model_fields(m) for m in (meta["model"], dataclasses.asdict(model_cfg)))
    diffs = [k for k in SHAPE_KEYS if saved.get(k) != current.get(k)]
    return diffs, "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in diffs)


def check_compatible(meta: dict, model_cfg, where: Path, global_batch_size: Optional[int] = None) -> None:
    """Refuse a resume the checkpoint cannot serve: another model shape, or another global batch
    (the data position and the LR schedule count in global batches of the saved size)."""
    diffs, detail = shape_diffs(meta, model_cfg)
    if diffs:
        raise ConfigError(
            f"model.{diffs[0]}", dataclasses.asdict(model_cfg).get(diffs[0]),
            f"checkpoint {where} was saved with a different model shape ({detail}). Resume with the "
            "same model config, or start a new run (train.resume=none and a new hydra.run.dir)",
        )
    saved_gbs = meta.get("global_batch_size")
    if global_batch_size is not None and saved_gbs is not None and saved_gbs != global_batch_size:
        raise ConfigError(
            "train.global_batch_size", global_batch_size,
            f"checkpoint {where} was trained with train.global_batch_size={saved_gbs} ({meta['step']} "
            f"steps, {meta['consumed_samples']} samples). Resume with train.global_batch_size="
            f"{saved_gbs} (any data-parallel size and micro-batch size that divide it), or start a "
            "new run (a new hydra.run.dir)",
        )


def load_latest(ckpt_root: Path, state: TrainState, model_cfg, *, log=print, **expect) -> Optional[dict]:
    """Load the newest loadable checkpoint under ckpt_root into `state` (falling back to older ones
    only when a checkpoint of the current layout fails to load: a corrupt or partial one).

    Returns its meta dict, or None when there is no checkpoint (`state` is then untouched).
    `expect`: load's global_batch_size and seed.
    """
    candidates = step_dirs(ckpt_root)
    for bad in sorted(ckpt_root.glob(".tmp-step_*")) if ckpt_root.is_dir() else []:
        log(f"ignoring incomplete checkpoint {bad} (the run stopped while saving it)")
    errors = []
    for path in reversed(candidates):
        try:
            return load(path, state, model_cfg, log=log, **expect)
        except (ConfigError, CheckpointError, KeyboardInterrupt, SystemExit):
            raise
        # torch.distributed.checkpoint's CheckpointException derives from BaseException
        except BaseException as exc:  # corrupt or incomplete: name it and try the previous one
            errors.append(f"{path}: {type(exc).__name__}: {exc}")
            log(f"checkpoint {path} cannot be loaded ({type(exc).__name__}: {str(exc)[:200]}); "
                "falling back to the previous checkpoint")
    if errors:
        raise CheckpointError("no loadable checkpoint under " + str(ckpt_root) + ":\n" + "\n".join(errors))
    return None


def resume(how: str, ckpt_root: Path, state: TrainState, model_cfg, *, log=print, **expect) -> Optional[dict]:
    """train.resume: "auto" loads the newest loadable checkpoint under ckpt_root (none there: a
    fresh start), "none" starts fresh, anything else is the checkpoint directory to load.
    Returns the loaded checkpoint's meta dict, or None for a fresh start. `expect`: load's
    global_batch_size and seed."""
    if how == "auto":
        return load_latest(ckpt_root, state, model_cfg, log=log, **expect)
    if how != "none":
        return load(Path(how), state, model_cfg, log=log, **expect)
    return None


def load(path: Path, state: TrainState, model_cfg, *, global_batch_size: Optional[int] = None,
         seed: int = 0, log=print) -> dict:
    """Restore `state` (weights, optimizer, schedule, step, consumed samples) and this rank's RNG
    streams from the checkpoint at `path`, on this job's layout; returns its meta dict.

    Raises ConfigError for a checkpoint of another model shape or global batch, and
    CheckpointError (no fallback: the checkpoint may be intact) when a checkpoint saved on another
    layout fails to load; anything else a load raises means a corrupt or partial checkpoint."""
    meta_file = path / META
    if not meta_file.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {META} is missing")
    meta = json.loads(meta_file.read_text())
    check_compatible(meta, model_cfg, path, global_batch_size)
    saved, now = meta.get("layout"), current_layout()
    rng_maps = saved is not None and all(saved[k] == now[k] for k in RNG_AXES)
    try:
        loaded = _load_into(state, path, with_rng=rng_maps)
    except BaseException as exc:
        if saved == now or isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise CheckpointError(
            f"checkpoint {path} was saved on {describe_layout(saved) if saved else 'an unrecorded layout'} "
            f"and cannot be loaded on {describe_layout(now)} ({type(exc).__name__}: {str(exc)[:300]}). "
            "It is not known to be corrupt: resume on the layout it was saved on, or with "
            "train.resume=<an older checkpoint> to try another") from exc
    if rng_maps:
        _set_rng_state(loaded["rng"])
    else:
        reseed(seed, meta["step"])
    state.step, state.consumed_samples = meta["step"], meta["consumed_samples"]
    if saved != now:
        rng = ("restored (data-parallel replicas share them)" if rng_maps else
               f"re-seeded from train.seed={seed} and step {meta['step']} (their layout changed: "
               "dropout draws differ from an unbroken run)")
        log(f"checkpoint {path} was saved on {describe_layout(saved) if saved else 'an unrecorded layout'}, "
            f"resuming on {describe_layout(now)}: weights and optimizer state resharded, RNG streams {rng}")
    return meta


def _load_into(state: TrainState, path: Path, *, with_rng: bool) -> dict:
    """Weights, optimizer state and LR schedule from the checkpoint at `path` into `state`;
    returns what was loaded (its "rng" entry when `with_rng`)."""
    loaded = dist_checkpointing.load(_sharded_state(state, is_loading=True, with_rng=with_rng), str(path),
                                     sharded_strategy=STRATEGY)
    for i, chunk in enumerate(state.model_chunks):
        chunk.load_state_dict(loaded[f"model{i}"])
    with torch.no_grad():  # distrib optimizer copies into views of leaf params
        state.optimizer.load_state_dict(loaded["optimizer"])
    untie_adam_steps(state.optimizer)
    state.scheduler.load_state_dict(loaded["scheduler"])
    return loaded


def reseed(seed: int, step: int) -> None:
    """Deterministic RNG streams for a resume whose saved streams do not map onto this layout:
    the same (seed, step) on the same layout gives the same streams, and not those of step 0."""
    torch.manual_seed(seed + step)
    tensor_parallel.model_parallel_cuda_manual_seed(seed + step)


# -- unsplit initial weights (train.layout_independent_init) ---------------------------------------
def unsplit_init_dir(scratch_dir: Optional[Path]) -> Path:
    """One directory every rank agrees on: under the run dir (shared by the nodes, like the
    checkpoints), or a temporary one made by rank 0 (single node)."""
    path = [str(Path(scratch_dir) / ".unsplit-init") if scratch_dir else
            (tempfile.mkdtemp(prefix="attnres-init-") if dist.get_rank() == 0 else None)]
    dist.broadcast_object_list(path, src=0)
    return Path(path[0])


def save_unsplit_init(model_cfg, parallel_cfg, dtype, seed: int, path: Path) -> None:
    """The unsplit model's initial weights (what one process gets from `seed`) as a megatron
    distributed checkpoint, so that any TP/PP/EP layout can start from them: dist_checkpointing
    reshards (TP slices, expert ranges, pipeline layer ranges), which a name mapping cannot.
    Every rank builds the whole model under TP=PP=EP=1 groups; the run's groups are restored after."""
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    dist.barrier()
    ps.destroy_model_parallel()
    init_model_parallel(ParallelConfig())
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    reference = build_model(model_cfg, params_dtype=dtype)
    dist_checkpointing.save({"model": reference.sharded_state_dict()}, str(path), sharded_strategy=STRATEGY)
    del reference
    ps.destroy_model_parallel()
    init_model_parallel(parallel_cfg)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def load_unsplit_init(chunks: list, path: Path) -> None:
    """Load each chunk's shard of save_unsplit_init's checkpoint, then remove it."""
    load_weights(chunks, path, what="unsplit init")
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)


def load_weights(chunks: list, path: Path, *, what: str) -> None:
    """Each model chunk's shard of the weights in the checkpoint at `path`, on this job's layout.

    Any checkpoint of this project serves: the shard keys are the unsplit model's parameter names,
    whatever layout wrote them and however its chunks were nested (a weights-only `{"model": ...}`
    or a training checkpoint's `model0`, `model1`, ...); megatron reshards them onto this rank's
    TP slices, expert range and pipeline layers."""
    for chunk in chunks:
        # transformer-engine's `_extra_state` (FP8 scaling metadata) is not a weight: a checkpoint
        # written without TE (an import on CPU) has none, and the layers keep their own
        wanted = {k: v for k, v in chunk.sharded_state_dict().items() if not k.endswith("_extra_state")}
        loaded = dist_checkpointing.load({"model": wanted}, str(path), sharded_strategy=STRATEGY)
        result = chunk.load_state_dict(loaded["model"], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise CheckpointError(f"{what} {path}: missing {missing}, unexpected {result.unexpected_keys}")


# -- train.init_from: the weights of another checkpoint, nothing else -------------------------------
def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory of this project: `path` itself, or a run dir's newest checkpoint.
    Raises FileNotFoundError naming what is missing."""
    path = Path(path)
    if not (path / META).is_file() and (path / "checkpoints").is_dir():
        found = step_dirs(path / "checkpoints")
        if not found:
            raise FileNotFoundError(f"{path} holds no complete checkpoint under checkpoints/")
        path = found[-1]
    if not (path / META).is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint of this project ({META} is missing)")
    return path


def init_from_checkpoint(init_from: str) -> Path:
    """train.init_from resolved to a checkpoint directory, or a ConfigError naming the key."""
    try:
        return resolve_checkpoint(Path(init_from))
    except FileNotFoundError as exc:
        raise ConfigError("train.init_from", init_from,
                          f"{exc}. Name a checkpoint directory (an `attnres-train-convert import` output, "
                          "a step_* directory) or a run directory") from None


def init_weights(path: Path, state: TrainState, model_cfg, *, log=print) -> dict:
    """train.init_from on a fresh start: this rank's model chunks get the weights of the
    checkpoint at `path` (any layout); the optimizer, LR schedule, step and data position start
    fresh. Returns the checkpoint's meta dict. A checkpoint of another model shape is a ConfigError."""
    meta = json.loads((path / META).read_text())
    diffs, detail = shape_diffs(meta, model_cfg)
    if diffs:
        raise ConfigError(
            "train.init_from", str(path),
            f"it holds another model ({detail}). Set the model config to the checkpoint's (its {META} "
            "lists it under \"model\"); to add AttnRes to a standard-residual model, import it with "
            "`attnres-train-convert import --residual block`")
    load_weights(state.model_chunks, path, what="train.init_from")
    state.optimizer.reload_model_params()  # main (fp32) copies of the loaded weights
    kind = meta.get("kind", "training checkpoint")
    log(f"initialised the weights from {path} ({kind}, step {meta.get('step', 0)}); optimizer, LR "
        "schedule and data position start fresh")
    return meta
