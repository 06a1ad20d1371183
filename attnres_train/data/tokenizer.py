"""Tokenizer: a byte-level BPE trained on the training documents, or the user's tokenizer.json.

``BPETokenizer`` wraps a ``tokenizers.Tokenizer`` in the duck type megatron's GPTDataset reads
(int ``vocab_size``, int ``eod``, a JSON-serialisable ``unique_identifiers`` dict), plus
``tokenize`` / ``detokenize`` and a content ``sha256`` (of ``Tokenizer.to_str()``), which keys every
cache built from its token ids.

The trained BPE (ByteLevel pre-tokenizer without prefix space, ByteLevel decoder, the full byte
alphabet, ``<|endoftext|>`` as special token 0 = end of document) is deterministic. It is cached at
``<cache_dir>/tokenizer/<key>/tokenizer.json``, key = sha256 over (the sources' content hashes and
valid fractions, vocab size), written to a temporary file and renamed, so a killed run never leaves
a half-written tokenizer behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

from attnres_train.data.corpus import no_documents_error
from attnres_train.errors import ConfigError

EOD_TOKEN = "<|endoftext|>"
# Fallbacks for a user tokenizer without <|endoftext|>, in order of preference (special tokens only).
EOS_LIKE_TOKENS = ("<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<|eot_id|>", "<|im_end|>", "<|endofdoc|>")
MIN_BPE_VOCAB = 257  # 256 byte tokens + <|endoftext|>
TOKENIZER_CACHE_VERSION = 1

ENCODE_CHUNK = 4096  # documents per encode_batch call


class BPETokenizer:
    """A ``tokenizers.Tokenizer`` as megatron's tokenizer duck type (see module docstring)."""

    def __init__(self, tokenizer, *, origin: str = "", eod: Optional[int] = None):
        self._tok = tokenizer
        self.origin = origin  # where it came from, for messages
        self._sha256 = hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()
        self.vocab_size: int = int(tokenizer.get_vocab_size(with_added_tokens=True))
        self.eod: int = int(eod) if eod is not None else _find_eod(tokenizer, origin)
        self.unique_identifiers = {
            "class": type(self).__name__,
            "sha256": self._sha256,
            "vocab_size": self.vocab_size,
        }

    # -- identity -----------------------------------------------------------------------------
    @property
    def sha256(self) -> str:
        return self._sha256

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def backend(self):
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    # -- text <-> ids ---------------------------------------------------------------------------
    def tokenize(self, text: str) -> List[int]:
        return self._tok.encode(text).ids

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """Encode many texts in parallel (tokenizers' thread pool; no offsets computed)."""
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(list(texts))]

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_token(self, i: int) -> Optional[str]:
        return self._tok.id_to_token(int(i))

    # -- files ----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write tokenizer.json atomically (temporary file in the same folder, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self._tok.to_str())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def from_file(cls, path: str | Path, *, key: str = "data.tokenizer") -> "BPETokenizer":
        """Load a tokenizer.json; a missing or unreadable file is a ConfigError naming ``key``."""
        from tokenizers import Tokenizer

        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(key, str(path), f"file not found: {p.resolve()} (give a tokenizers tokenizer.json, "
                              "or leave it null to train a byte-level BPE on the training data)")
        try:
            tok = Tokenizer.from_file(str(p))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ConfigError(key, str(path), f"cannot load it as a `tokenizers` tokenizer.json ({e})") from None
        return cls(tok, origin=str(p.resolve()))

    def __repr__(self) -> str:
        return (f"BPETokenizer(vocab_size={self.vocab_size}, eod={self.eod}, sha256={self._sha256[:12]}, "
                f"origin={self.origin!r})")


def _find_eod(tokenizer, origin: str) -> int:
    eod = tokenizer.token_to_id(EOD_TOKEN)
    if eod is not None:
        return eod
    special = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    for name in EOS_LIKE_TOKENS:
        if name in special:
            return special[name]
    raise ConfigError(
        "data.tokenizer", origin or "<tokenizer>",
        f"has no end-of-document token: add {EOD_TOKEN!r} (or an eos special token such as "
        f"{', '.join(EOS_LIKE_TOKENS[:3])}) to its special tokens; special tokens found: {sorted(special)[:10]}",
    )


def train_bpe(documents: Iterable[str], vocab_size: int):
    """Train the byte-level BPE on ``documents``; returns a ``tokenizers.Tokenizer`` (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_BPE_VOCAB:
        raise ConfigError("data.vocab_size", vocab_size,
                          f"a byte-level BPE needs at least {MIN_BPE_VOCAB} tokens (256 bytes + {EOD_TOKEN})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer)
    return tok


def tokenizer_cache_key(sources, vocab_size: int) -> str:
    desc = {
        "version": TOKENIZER_CACHE_VERSION,
        "kind": "byte-level-bpe",
        "vocab_size": int(vocab_size),
        "sources": [{"sha256": s.sha256, "kind": s.kind, "valid_fraction": s.valid_fraction} for s in sources],
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


def load_or_train(sources, vocab_size: int, cache_dir: str | Path, log=None) -> Tuple[BPETokenizer, dict]:
    """The BPE for ``sources`` (their training parts), from the cache or trained and cached.

    Returns (tokenizer, info) with info = {"path", "trained": bool, "seconds", "documents"}.
    """
    log = log or (lambda msg: None)
    if vocab_size < MIN_BPE_VOCAB:
        raise ConfigError("data.vocab_size", vocab_size,
                          f"a byte-level BPE needs at least {MIN_BPE_VOCAB} tokens (256 bytes + {EOD_TOKEN})")
    key = tokenizer_cache_key(sources, vocab_size)
    folder = Path(cache_dir) / "tokenizer" / key
    path = folder / "tokenizer.json"
    if path.is_file():
        try:
            tok = BPETokenizer.from_file(path)
            log(f"tokenizer: cached byte-level BPE ({tok.vocab_size} tokens) {path}")
            return tok, {"path": str(path), "trained": False, "seconds": 0.0, "documents": None}
        except ConfigError:
            pass  # unreadable cache entry: retrain and replace it
    counts = [0] * len(sources)

    def docs():
        for i, s in enumerate(sources):
            for d in s.documents("train"):
                counts[i] += 1
                yield d

    names = ", ".join(s.name for s in sources)
    log(f"tokenizer: training a byte-level BPE ({vocab_size} tokens) on the training part of {names} ...")
    t0 = time.perf_counter()
    raw = train_bpe(docs(), vocab_size)
    seconds = time.perf_counter() - t0
    for s, n in zip(sources, counts):
        if n == 0:
            raise no_documents_error(s, "train")
    n_docs = sum(counts)
    tok = BPETokenizer(raw, origin=str(path))
    tok.save(path)
    meta = {
        "vocab_size_requested": int(vocab_size),
        "vocab_size": tok.vocab_size,
        "eod": tok.eod,
        "sha256": tok.sha256,
        "documents": n_docs,
        "seconds": round(seconds, 3),
        "sources": [{"path": s.path, "sha256": s.sha256, "valid_fraction": s.valid_fraction} for s in sources],
    }
    _write_json_atomic(folder / "meta.json", meta)
    log(f"tokenizer: trained in {seconds:.2f} s on {n_docs:,} documents "
        f"({tok.vocab_size} tokens) -> {path}")
    return tok, {"path": str(path), "trained": True, "seconds": seconds, "documents": n_docs}


def _write_json_atomic(path: Path, obj) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
