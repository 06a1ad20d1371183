"""Raw text sources: the bundled tinyshakespeare corpus and the user's .txt / .jsonl files.

A source is split deterministically into a training and a validation part, never shuffled across
the cut:

- ``.txt``: the last ``valid_fraction`` of the *lines* is validation (cut at a line boundary);
  documents are the blank-line-separated blocks of each part (a block cut by the line boundary
  becomes two documents, one on each side). A document's text is its lines, each ending in ``"\\n"``
  (a CRLF file's ``"\\r\\n"`` becomes ``"\\n"``).
- ``.jsonl``: one JSON object with a string ``text`` field per line; the last ``valid_fraction`` of
  the records is validation; each record is one document (blank lines and empty texts are skipped).

The bundled corpus is a ``.txt`` source whose sha256 is checked on every load.

Everything here streams: nothing holds a whole file in memory, so large user files are fine.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Tuple

from attnres_train.errors import ConfigError

DEFAULT_CORPUS_PATH = Path(__file__).resolve().parent / "corpora" / "tinyshakespeare.txt"
DEFAULT_CORPUS_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl",)
ROLES = ("train", "valid")

_CHUNK = 1 << 20


class CorpusIntegrityError(RuntimeError):
    """The bundled corpus on disk is not the file the project ships (modified or truncated)."""


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def valid_count(n_units: int, valid_fraction: float) -> int:
    """How many of the last lines/records are validation (rounded to the nearest unit)."""
    return int(round(n_units * valid_fraction))


@dataclass(frozen=True)
class TextSource:
    """One raw text file and how it is split. ``units`` are lines (txt) or records (jsonl)."""

    path: str  # absolute
    kind: str  # "txt" | "jsonl"
    sha256: str
    valid_fraction: float
    num_units: int
    name: str  # short name for messages and cache descriptions

    @property
    def unit(self) -> str:
        return "line" if self.kind == "txt" else "record"

    @property
    def num_valid_units(self) -> int:
        return valid_count(self.num_units, self.valid_fraction)

    @property
    def num_train_units(self) -> int:
        return self.num_units - self.num_valid_units

    def unit_range(self, role: str) -> Tuple[int, int]:
        """[start, stop) of the lines/records that belong to ``role``."""
        if role == "train":
            return 0, self.num_train_units
        if role == "valid":
            return self.num_train_units, self.num_units
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")

    def documents(self, role: str) -> Iterator[str]:
        for doc, _ in self.documents_with_progress(role):
            yield doc

    def documents_with_progress(self, role: str) -> Iterator[Tuple[str, int]]:
        """Yield (document, lines/records consumed since the previous document)."""
        start, stop = self.unit_range(role)
        if self.kind == "txt":
            return _txt_documents(self.path, start, stop)
        return _jsonl_documents(self.path, start, stop)


def _count_lines(path: str) -> int:
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")  # a last line without its newline still counts


def _count_records(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for raw in f if raw.strip())


def _decode(raw: bytes, path: str, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError("data.paths", path,
                          f"line {lineno} is not valid UTF-8 ({e.reason}); save the file as UTF-8") from None


def _strip_eol(line: str) -> str:
    if line.endswith("\n"):
        line = line[:-1]
    if line.endswith("\r"):
        line = line[:-1]
    return line


def _txt_documents(path: str, start: int, stop: int) -> Iterator[Tuple[str, int]]:
    block: list[str] = []
    consumed = 0
    with open(path, "rb") as f:
        for i, raw in enumerate(f):
            if i >= stop:
                break
            if i < start:
                continue
            consumed += 1
            line = _strip_eol(_decode(raw, path, i + 1))
            if line.strip():
                block.append(line)
            elif block:
                yield "\n".join(block) + "\n", consumed
                block, consumed = [], 0
    if block:
        yield "\n".join(block) + "\n", consumed


def _jsonl_documents(path: str, start: int, stop: int) -> Iterator[Tuple[str, int]]:
    record = -1
    consumed = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            record += 1
            if record >= stop:
                break
            if record < start:
                continue
            consumed += 1
            line = _decode(raw, path, lineno)
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError("data.paths", path, f"line {lineno} is not valid JSON ({e.msg}); jsonl needs one "
                                  '{"text": ...} object per line') from None
            if not isinstance(obj, dict) or "text" not in obj:
                what = f"keys {sorted(obj)[:8]}" if isinstance(obj, dict) else f"a JSON {type(obj).__name__}"
                raise ConfigError("data.paths", path, f"line {lineno}: record has no 'text' field ({what}); jsonl "
                                  'needs one {"text": ...} object per line')
            text = obj["text"]
            if not isinstance(text, str):
                raise ConfigError("data.paths", path, f"line {lineno}: 'text' is a {type(text).__name__}, not a string")
            if text:
                yield text, consumed
                consumed = 0


def no_documents_error(source: TextSource, role: str) -> ConfigError:
    """The error for a split of ``source`` without any document."""
    start, stop = source.unit_range(role)
    if role == "valid":
        return ConfigError(
            "data.valid_fraction", source.valid_fraction,
            f"the validation part of {source.path} (the last {stop - start} of {source.num_units} {source.unit}s) has "
            f"no documents: use a larger fraction or a larger file",
        )
    return ConfigError(
        "data.paths", source.path,
        f"has no documents in its training part (the first {stop - start} of {source.num_units} {source.unit}s): "
        + ("documents are blank-line-separated blocks of text" if source.kind == "txt"
           else "records need a non-empty text"),
    )


def _check_fraction(valid_fraction: float) -> None:
    if not 0.0 <= valid_fraction < 1.0:
        raise ConfigError("data.valid_fraction", valid_fraction,
                          "choose 0 <= fraction < 1 (the last fraction of lines/records is validation; "
                          "0.1 is the default)")


def text_source(path: str | Path, valid_fraction: float, *, sha256: str | None = None,
                name: str | None = None) -> TextSource:
    """A user's .txt or .jsonl file (checked: exists, not empty, not a directory)."""
    _check_fraction(valid_fraction)
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        kind = "txt"
    elif suffix in JSONL_SUFFIXES:
        kind = "jsonl"
    else:
        raise ConfigError("data.paths", str(path),
                          "unknown format: use .txt, .jsonl or a megatron prefix (PREFIX.bin + PREFIX.idx)")
    if not p.is_file():
        raise ConfigError("data.paths", str(path), f"file not found: {p.resolve()}")
    if p.stat().st_size == 0:
        raise ConfigError("data.paths", str(path), f"the file is empty: {p.resolve()}")
    ap = str(p.resolve())
    n = _count_lines(ap) if kind == "txt" else _count_records(ap)
    if n == 0:
        raise ConfigError("data.paths", str(path), f"has no {'lines' if kind == 'txt' else 'records'}: {ap}")
    return TextSource(path=ap, kind=kind, sha256=sha256 or file_sha256(ap), valid_fraction=float(valid_fraction),
                      num_units=n, name=name or p.name)


def default_corpus(valid_fraction: float = 0.1) -> TextSource:
    """The bundled tinyshakespeare corpus, sha256-checked. 40,000 lines; 0.1 gives 36,000 / 4,000."""
    path = Path(DEFAULT_CORPUS_PATH)
    if not path.is_file():
        raise CorpusIntegrityError(f"the bundled corpus is missing: {path} (restore it from the repository)")
    actual = file_sha256(path)
    if actual != DEFAULT_CORPUS_SHA256:
        raise CorpusIntegrityError(
            f"the bundled corpus {path} was modified or truncated: sha256 is {actual}, expected "
            f"{DEFAULT_CORPUS_SHA256} ({path.stat().st_size:,} bytes; the original has 1,115,394). Restore it, e.g. "
            f"`git checkout -- {path.name}` in its folder, or pass your own data with data.paths=[...]"
        )
    return text_source(path, valid_fraction, sha256=actual, name="tinyshakespeare")
