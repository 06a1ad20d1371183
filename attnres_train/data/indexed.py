"""Megatron indexed datasets (.bin/.idx): writing ours from text, checking the user's prebuilt ones.

Writing: one sequence per document, the document's token ids followed by the EOD token (megatron's
GPTDataset counts and shuffles sequences and never inserts EOD itself). dtype is
``DType.optimal_dtype(vocab_size)`` (uint16 below 65,500 tokens, else int32).

Cache: ``<cache_dir>/indexed/<key>/data.{bin,idx}`` + ``meta.json``, key = sha256 over (source
content hash, tokenizer sha256, split role, valid_fraction). The folder is written under a temporary
name and renamed when complete, so a killed run never leaves a half-written prefix that is later
trusted; ``meta.json`` is written last and marks a complete entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy

from attnres_train.data.corpus import no_documents_error
from attnres_train.data.tokenizer import ENCODE_CHUNK
from attnres_train.errors import ConfigError

INDEXED_CACHE_VERSION = 1
PROGRESS_MIN_BYTES = 4 << 20  # show a progress bar for sources at least this large


@dataclass(frozen=True)
class Prefix:
    """A megatron prefix (PREFIX.bin + PREFIX.idx) and what we know about it."""

    prefix: str
    role: str  # train | valid
    name: str  # for messages
    num_documents: int
    num_tokens: int
    built: bool = False  # True when this call wrote it (False: cache hit or prebuilt)
    seconds: float = 0.0


def indexed_cache_key(source_sha256: str, tokenizer_sha256: str, role: str, valid_fraction: float) -> str:
    desc = {
        "version": INDEXED_CACHE_VERSION,
        "source_sha256": source_sha256,
        "tokenizer_sha256": tokenizer_sha256,
        "role": role,
        "valid_fraction": float(valid_fraction),
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


def _chunks(iterable, n):
    buf = []
    for item in iterable:
        buf.append(item)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def build_indexed(source, role: str, tokenizer, cache_dir: str | Path, *, show_progress: Optional[bool] = None,
                  log=None) -> Prefix:
    """Tokenize ``role`` (train/valid) of a TextSource into a cached megatron prefix."""
    log = log or (lambda msg: None)
    key = indexed_cache_key(source.sha256, tokenizer.sha256, role, source.valid_fraction)
    parent = Path(cache_dir) / "indexed"
    final = parent / key
    meta_path = final / "meta.json"
    if meta_path.is_file() and (final / "data.bin").is_file() and (final / "data.idx").is_file():
        meta = json.loads(meta_path.read_text())
        p = Prefix(str(final / "data"), role, source.name, meta["documents"], meta["tokens"])
        log(f"indexed {role}: cached {source.name} ({p.num_documents:,} documents, {p.num_tokens:,} tokens) {final}")
        return p

    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from tqdm import tqdm

    parent.mkdir(parents=True, exist_ok=True)
    if show_progress is None:
        show_progress = os.path.getsize(source.path) >= PROGRESS_MIN_BYTES
    start, stop = source.unit_range(role)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    eod = tokenizer.eod
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".tmp-{key[:16]}-"))
    t0 = time.perf_counter()
    try:
        builder = IndexedDatasetBuilder(str(tmp / "data.bin"), dtype=dtype)
        n_docs = n_tokens = 0
        max_len = 0
        with tqdm(total=stop - start, unit=source.unit, desc=f"tokenizing {source.name} [{role}]", file=sys.stderr,
                  disable=not show_progress, dynamic_ncols=True) as bar:
            for chunk in _chunks(source.documents_with_progress(role), ENCODE_CHUNK):
                encoded = tokenizer.tokenize_batch([doc for doc, _ in chunk])
                for ids in encoded:
                    arr = numpy.empty(len(ids) + 1, dtype=dtype)
                    arr[:-1] = ids
                    arr[-1] = eod
                    builder.add_document(arr, [arr.size])
                    n_tokens += arr.size
                    max_len = max(max_len, arr.size)
                n_docs += len(chunk)
                bar.update(sum(u for _, u in chunk))
            bar.update(max(0, bar.total - bar.n))
        builder.finalize(str(tmp / "data.idx"))
        if n_docs == 0:
            raise no_documents_error(source, role)
        seconds = time.perf_counter() - t0
        meta = {
            "source": source.path,
            "source_sha256": source.sha256,
            "kind": source.kind,
            "role": role,
            "valid_fraction": source.valid_fraction,
            f"{source.unit}s": [start, stop],
            "tokenizer_sha256": tokenizer.sha256,
            "vocab_size": tokenizer.vocab_size,
            "eod": eod,
            "dtype": numpy.dtype(dtype).name,
            "documents": n_docs,
            "tokens": n_tokens,
            "max_document_tokens": max_len,
            "seconds": round(seconds, 3),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished the same entry first: its content is identical, keep it.
            if meta_path.is_file():
                shutil.rmtree(tmp, ignore_errors=True)
            else:  # an incomplete entry (not written by us: we only rename complete folders)
                shutil.rmtree(final)
                os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"indexed {role}: wrote {source.name} ({n_docs:,} documents, {n_tokens:,} tokens) "
        f"in {seconds:.2f} s -> {final}")
    return Prefix(str(final / "data"), role, source.name, n_docs, n_tokens, built=True, seconds=seconds)


def check_prefix_files(prefix: str, key: str) -> str:
    """PREFIX.bin and PREFIX.idx exist and are not empty; returns the expanded prefix."""
    p = str(Path(prefix).expanduser())
    for ext in (".bin", ".idx"):
        if p.endswith(ext):
            raise ConfigError(key, prefix,
                              f"give the prefix without {ext}: {p[: -len(ext)]!r} (for PREFIX.bin + PREFIX.idx)")
    missing = [p + ext for ext in (".bin", ".idx") if not os.path.isfile(p + ext)]
    if missing and os.path.isfile(p):
        raise ConfigError(key, prefix, "unknown format: use .txt (blank-line-separated documents), .jsonl "
                          '({"text": ...} per line) or a megatron prefix (PREFIX.bin + PREFIX.idx)')
    if missing:
        raise ConfigError(
            key, prefix,
            f"not a .txt/.jsonl file and not a megatron prefix: {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing (a prefix needs PREFIX.bin and PREFIX.idx)",
        )
    if os.path.getsize(p + ".bin") == 0 or os.path.getsize(p + ".idx") == 0:
        raise ConfigError(key, prefix, f"the prefix is empty: {p}.bin / {p}.idx hold no tokens")
    return p


def check_prefix(prefix: str, role: str, key: str, vocab_size: Optional[int] = None) -> Prefix:
    """Check a prebuilt prefix before megatron opens it (its own errors are unclear: docs/data.md)."""
    p = check_prefix_files(prefix, key)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    try:
        ds = IndexedDataset(p, multimodal=False, mmap=True)
    except Exception as e:
        raise ConfigError(key, prefix, f"cannot read the megatron prefix ({type(e).__name__}: {e})") from None
    lengths = ds.sequence_lengths
    n_tokens = int(lengths.sum()) if len(lengths) else 0
    if n_tokens == 0:
        raise ConfigError(key, prefix, "the prefix is empty (0 sequences / 0 tokens)")
    if vocab_size is not None and os.path.getsize(p + ".bin") <= (1 << 30):
        top = int(numpy.memmap(p + ".bin", dtype=ds.index.dtype, mode="r").max())
        if top >= vocab_size:
            raise ConfigError(
                key, prefix,
                f"holds token id {top} but the tokenizer has {vocab_size} tokens: set data.tokenizer to the "
                f"tokenizer.json this prefix was written with",
            )
    return Prefix(p, role, os.path.basename(p), int(len(ds.document_indices) - 1), n_tokens)

