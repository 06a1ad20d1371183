"""Train/valid GPTDatasets from ``DataConfig``, a resumable data-parallel sampler, and the collate.

``build_datasets`` runs in three stages:

1. checks (every rank, cheap): files exist and are not empty, formats, weights, fractions, the
   user's tokenizer loads;
2. preparation (rank 0 first, then a barrier, then the other ranks, which hit the cache): the BPE
   (``tokenizer.py``) and one megatron prefix per text source and split (``indexed.py``);
3. megatron: ``GPTDatasetConfig`` with ``blend_per_split`` (separate train and valid prefixes, so
   the line cut is exact) and ``BlendedMegatronDatasetBuilder(GPTDataset, ...).build()``, whose
   sample indices are cached under ``<cache_dir>/samples/<key>``, key = sha256 over (the prefixes
   and their .idx contents, tokenizer sha256, seq_length, dataset flags): megatron's own md5 does
   not cover file contents or all flags (docs/data.md#cache-keys-datasetpy).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from attnres_train.data.corpus import (
    JSONL_SUFFIXES,
    TEXT_SUFFIXES,
    TextSource,
    _check_fraction,
    default_corpus,
    file_sha256,
    text_source,
)
from attnres_train.data.indexed import Prefix, build_indexed, check_prefix, check_prefix_files
from attnres_train.data.tokenizer import BPETokenizer, load_or_train
from attnres_train.errors import ConfigError
from parallel.groups import global_rank, is_distributed

SAMPLES_CACHE_VERSION = 1

# The dataset flags we use; they are part of the samples cache key.
DATASET_FLAGS = dict(
    reset_position_ids=False,
    reset_attention_mask=False,
    eod_mask_loss=False,
    create_attention_mask=False,
    drop_last_partial_validation_sequence=True,
    add_extra_token_to_sequence=True,
)

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


# ------------------------------------------------------------------------------------------------
# distributed helpers
# ------------------------------------------------------------------------------------------------
def log0(msg: str) -> None:
    """One-line progress message, printed on rank 0 only."""
    if global_rank() == 0:
        print(f"[data] {msg}", flush=True)


def _rank0_first(fn: Callable[[Callable], object]):
    """Run ``fn(log)`` on rank 0, barrier, then on the other ranks (which then hit rank 0's caches).

    Without torch.distributed this is just ``fn(log0)``. If rank 0 fails, it raises and exits, and
    torchrun stops the other ranks waiting at the barrier.
    """
    if not is_distributed() or torch.distributed.get_world_size() == 1:
        return fn(log0)
    if torch.distributed.get_rank() == 0:
        out = fn(log0)
        torch.distributed.barrier()
        return out
    torch.distributed.barrier()
    return fn(lambda msg: None)


# ------------------------------------------------------------------------------------------------
# stage 1: the plan (checks on every rank)
# ------------------------------------------------------------------------------------------------
@dataclass
class _Entry:
    weight: float
    source: Optional[TextSource] = None  # a .txt/.jsonl (or the bundled corpus)
    prefix: Optional[str] = None  # a prebuilt megatron prefix


def _is_text(path: str) -> bool:
    return str(path).lower().endswith(TEXT_SUFFIXES + JSONL_SUFFIXES)


def _plan(data_cfg) -> Tuple[List[_Entry], List[str]]:
    _check_fraction(data_cfg.valid_fraction)
    paths = [str(p) for p in (data_cfg.paths or [])]
    n = len(paths) or 1
    weights = data_cfg.weights
    if weights is not None:
        weights = list(weights)
        if len(weights) != n:
            what = f"{len(paths)} data.paths" if paths else "the bundled corpus (data.paths is empty)"
            raise ConfigError("data.weights", weights,
                              f"give one weight per path: {n} for {what}, or null for equal weights")
        for w in weights:
            if not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
                raise ConfigError("data.weights", weights, f"every weight must be a positive number (got {w!r})")
    weights = [float(w) for w in weights] if weights is not None else [1.0] * n
    if not paths:
        entries = [_Entry(weights[0], source=default_corpus(data_cfg.valid_fraction))]
    else:
        entries = []
        for p, w in zip(paths, weights):
            if _is_text(p):
                entries.append(_Entry(w, source=text_source(p, data_cfg.valid_fraction)))
            else:
                check_prefix_files(p, "data.paths")
                entries.append(_Entry(w, prefix=p))
    for s in (e.source for e in entries if e.source is not None):
        if s.valid_fraction > 0 and s.num_valid_units == 0:
            raise ConfigError("data.valid_fraction", s.valid_fraction,
                              f"{s.path} has {s.num_units} {s.unit}s: the validation part is empty; "
                              "use a larger fraction or file")
    valid_paths = [str(p) for p in (data_cfg.valid_paths or [])]
    for v in valid_paths:
        if _is_text(v):
            raise ConfigError("data.valid_paths", v, "give prebuilt megatron prefixes here; .txt/.jsonl files in "
                              "data.paths are split into train and valid by data.valid_fraction")
        check_prefix_files(v, "data.valid_paths")
    return entries, valid_paths


def _cache_root(cache_dir) -> Path:
    root = Path(cache_dir).expanduser().resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ConfigError("data.cache_dir", str(cache_dir),
                          f"cannot write there ({e.strerror}); choose a writable folder") from None
    return root


# ------------------------------------------------------------------------------------------------
# stage 2: tokenizer + indexed datasets
# ------------------------------------------------------------------------------------------------
@dataclass
class PreparedData:
    """What ``prepare_data`` made: the tokenizer and the megatron prefixes with their weights."""

    tokenizer: BPETokenizer
    train: List[Prefix]
    train_weights: List[float]
    valid: List[Prefix]
    cache_dir: Path
    tokenizer_info: dict = field(default_factory=dict)
    sources: List[TextSource] = field(default_factory=list)


def prepare_data(data_cfg, cache_dir=None) -> PreparedData:
    """Stages 1 and 2 of ``build_datasets``: checked sources, tokenizer and .bin/.idx prefixes."""
    root = _cache_root(cache_dir if cache_dir is not None else data_cfg.cache_dir)
    entries, valid_paths = _plan(data_cfg)
    sources = [e.source for e in entries if e.source is not None]
    user_tok = BPETokenizer.from_file(data_cfg.tokenizer) if data_cfg.tokenizer else None
    if user_tok is None and not sources:
        raise ConfigError("data.tokenizer", None, "data.paths holds only prebuilt megatron prefixes: set "
                          "data.tokenizer to the tokenizer.json their token ids come from")

    def prepare(log):
        for s in sources:
            tr, va = s.num_train_units, s.num_valid_units
            log(f"source {s.name}: {s.path} ({s.kind}, sha256 {s.sha256[:12]}): {tr:,} train / {va:,} valid {s.unit}s")
        if user_tok is not None:
            tok, info = user_tok, {"path": user_tok.origin, "trained": False, "seconds": 0.0}
            log(f"tokenizer: {user_tok.origin} ({tok.vocab_size} tokens, eod {tok.eod})")
        else:
            tok, info = load_or_train(sources, data_cfg.vocab_size, root, log=log)
        built = {}
        for s in sources:
            for role in ("train", "valid"):
                if role == "valid" and s.num_valid_units == 0:
                    continue  # valid_fraction=0 (checked in _plan)
                built[(s.path, role)] = build_indexed(s, role, tok, root, log=log)
        return tok, info, built

    tok, info, built = _rank0_first(prepare)
    train, train_weights, valid = [], [], []
    for e in entries:
        if e.source is not None:
            train.append(built[(e.source.path, "train")])
            if (e.source.path, "valid") in built:
                valid.append(built[(e.source.path, "valid")])
        else:
            train.append(check_prefix(e.prefix, "train", "data.paths", tok.vocab_size))
        train_weights.append(e.weight)
    valid += [check_prefix(v, "valid", "data.valid_paths", tok.vocab_size) for v in valid_paths]
    return PreparedData(tok, train, train_weights, valid, root, info, sources)


# ------------------------------------------------------------------------------------------------
# stage 3: megatron datasets
# ------------------------------------------------------------------------------------------------
def _samples_cache_dir(root: Path, prep: PreparedData, seq_length: int) -> Path:
    desc = {
        "version": SAMPLES_CACHE_VERSION,
        "train": [(p.prefix, file_sha256(p.prefix + ".idx")) for p in prep.train],
        "valid": [(p.prefix, file_sha256(p.prefix + ".idx")) for p in prep.valid],
        "tokenizer_sha256": prep.tokenizer.sha256,
        "seq_length": int(seq_length),
        "flags": DATASET_FLAGS,
    }
    key = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()
    folder = root / "samples" / key[:32]
    if global_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        info = folder / "key.json"
        if not info.is_file():
            tmp = folder / f".key.json.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(desc, indent=2))
            os.replace(tmp, info)
    return folder


@contextmanager
def _quiet(logger_name: str):
    lg = logging.getLogger(logger_name)
    old = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(old)


def _builder_class():
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    class _Builder(BlendedMegatronDatasetBuilder):
        """Megatron's builder, except that a blend built without torch.distributed skips the blend
        index cache: BlendedDataset calls ``torch.distributed.get_rank()`` unguarded when it has a
        ``path_to_cache`` (docs/data.md). Its indices are cheap to rebuild."""

        @staticmethod
        def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):
            if cls is BlendedDataset and not is_distributed():
                datasets, weights, size, config = args
                config = copy.copy(config)
                config.path_to_cache = None
                with _quiet("megatron.core.datasets.blended_dataset"):
                    return BlendedDataset(datasets, weights, size, config)
            return BlendedMegatronDatasetBuilder.build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args)

    return _Builder


def _check_tokens(prefixes: Sequence[Prefix], seq_length: int) -> None:
    need = seq_length + 1
    for p in prefixes:
        if p.num_tokens < need:
            raise ConfigError(
                "model.seq_length", seq_length,
                f"{p.role} split of {p.name} has {p.num_tokens:,} tokens; model.seq_length={seq_length} needs at least "
                f"{need:,} (one sample is seq_length + 1 tokens): shorten model.seq_length or add data",
            )


def build_datasets(data_cfg, *, seq_length: int, seed: int, train_samples: Optional[int], valid_samples: Optional[int],
                   cache_dir=None):
    """Build (train_ds, valid_ds, tokenizer) from a ``DataConfig``.

    ``train_samples``: samples the run draws (steps x global batch size; None: one epoch). With more
    than one training source it must be an int, since the blend weights need a size. Megatron
    rounds a single source up to whole epochs, so ``len(train_ds) >= train_samples``.
    ``valid_samples``: None is one pass over the validation data (several sources: each once);
    an int draws that many, sources in proportion to their token counts. A blend's length is the
    sum of its sources' shares, each rounded up, so it can exceed the request by a sample or two.
    ``valid_ds`` is None when there is no validation data (valid_fraction 0 and no valid_paths).
    Items are dicts of tokens, labels, loss_mask, position_ids ([seq_length] each; a blend adds
    dataset_id). Resume: call again with the same arguments and start ``ResumableSampler`` at the
    checkpoint's consumed_samples; a different train_samples changes the shuffle.
    """
    if not isinstance(seq_length, int) or seq_length < 1:
        raise ConfigError("model.seq_length", seq_length, "must be a positive integer")
    prep = prepare_data(data_cfg, cache_dir)
    tok = prep.tokenizer
    _check_tokens(prep.train + prep.valid, seq_length)

    train_w = prep.train_weights if len(prep.train) > 1 else None
    if train_w is not None and train_samples is None:
        if data_cfg.weights is not None:
            raise ValueError("build_datasets: blending with data.weights needs train_samples (an int)")
        train_w = None  # one epoch of every source
    valid_w = None
    if len(prep.valid) > 1 and valid_samples is not None:
        valid_w = [float(p.num_tokens) for p in prep.valid]
    train_blend = ([p.prefix for p in prep.train], train_w)
    valid_blend = ([p.prefix for p in prep.valid], valid_w) if prep.valid else None

    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    path_to_cache = _samples_cache_dir(prep.cache_dir, prep, seq_length)
    config = GPTDatasetConfig(
        random_seed=int(seed),
        sequence_length=int(seq_length),
        blend_per_split=[train_blend, valid_blend, None],
        path_to_cache=str(path_to_cache),
        tokenizer=tok,
        mmap_bin_files=True,
        num_dataset_builder_threads=1,
        **DATASET_FLAGS,
    )
    if valid_blend is None:
        log0("no validation data (data.valid_fraction=0 and no data.valid_paths): valid_ds is None")
    sizes = [train_samples, valid_samples if valid_blend is not None else None, None]
    train_ds, valid_ds, _ = _builder_class()(GPTDataset, sizes, lambda: True, config).build()
    log0(
        f"samples: train {len(train_ds):,} (requested {train_samples if train_samples is not None else 'one epoch'}), "
        f"valid {len(valid_ds) if valid_ds is not None else 0:,} at seq_length {seq_length}; "
        f"indices cached in {path_to_cache}"
    )
    return train_ds, valid_ds, tok


# ------------------------------------------------------------------------------------------------
# sampling and batching
# ------------------------------------------------------------------------------------------------
def batch_indices(consumed_samples: int, global_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                  micro_batch_size: Optional[int] = None) -> List[int]:
    """This data-parallel rank's sample indices of the global batch that starts at ``consumed_samples``.

    The global batch is ``consumed_samples .. consumed_samples + global_batch_size - 1``, taken as
    consecutive micro-batch groups of ``micro_batch_size * dp_size`` samples; rank r gets the r-th
    ``micro_batch_size`` slice of each group (as Megatron-LM's pretraining sampler). Returned in
    micro-batch order: slice it by ``micro_batch_size`` for gradient accumulation.
    ``micro_batch_size=None``: one micro-batch per rank (``global_batch_size // dp_size``).
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    if consumed_samples < 0:
        raise ValueError(f"consumed_samples={consumed_samples} must be >= 0")
    mbs = micro_batch_size if micro_batch_size is not None else global_batch_size // dp_size
    if mbs < 1 or global_batch_size % (mbs * dp_size):
        raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                         f"micro_batch_size x dp_size = {mbs} x {dp_size}")
    group = mbs * dp_size
    out: List[int] = []
    for g in range(global_batch_size // group):
        start = consumed_samples + g * group + dp_rank * mbs
        out.extend(range(start, start + mbs))
    return out


def collate(samples: Sequence[Dict]) -> Dict[str, torch.Tensor]:
    """Stack samples into tokens/labels/position_ids (int64) and loss_mask (float32), each [B, S]."""
    out = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in BATCH_KEYS}
    out["tokens"] = out["tokens"].long()
    out["labels"] = out["labels"].long()
    out["position_ids"] = out["position_ids"].long()
    out["loss_mask"] = out["loss_mask"].float()
    if torch.cuda.is_available():
        out = {k: v.cuda(non_blocking=True) for k, v in out.items()}
    return out
