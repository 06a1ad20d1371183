"""Hugging Face model directories: config.json + safetensors (one file, or shards and an index).

HFReader opens every shard lazily (safetensors' safe_open: a tensor is read when asked for), so a
conversion holds one entry's tensors at a time. HFWriter writes tensors in order into shards of at
most `max_shard_bytes`, each written once it is full, then `model.safetensors.index.json` (or, for
a single shard, plain `model.safetensors`), as `save_pretrained` lays them out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class HFFormatError(ValueError):
    """A Hugging Face directory this converter cannot read: the message names the file and the fix."""


def read_config(path: Path) -> dict:
    """config.json of an HF directory (or the file itself)."""
    path = Path(path)
    file = path / CONFIG if path.is_dir() else path
    if not file.is_file():
        raise HFFormatError(f"{file} does not exist: an HF model directory holds config.json and safetensors")
    return json.loads(file.read_text())


class HFReader:
    """The tensors of an HF model directory, by name, read on demand."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        index, single = self.dir / INDEX, self.dir / SINGLE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif single.is_file():
            weight_map = None
        else:
            found = sorted(p.name for p in self.dir.glob("*.safetensors"))
            raise HFFormatError(f"{self.dir} has neither {INDEX} nor {SINGLE}"
                                + (f" (found {', '.join(found)})" if found else ""))
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE]
        missing = [f for f in files if not (self.dir / f).is_file()]
        if missing:
            raise HFFormatError(f"{self.dir}: shard {missing[0]} named in {INDEX} is missing "
                                f"({len(missing)} of {len(files)} shards missing); download it again")
        self._handles = {f: safe_open(str(self.dir / f), framework="pt") for f in files}
        self.weight_map: Dict[str, str] = weight_map or {k: SINGLE for k in self._handles[SINGLE].keys()}

    def names(self) -> List[str]:
        return list(self.weight_map)

    def resolve(self, name: str, aliases=()) -> str:
        """`name`, or the first of its `aliases` the directory holds."""
        for candidate in (name, *aliases):
            if candidate in self.weight_map:
                return candidate
        raise HFFormatError(f"{self.dir}: tensor {name} is missing (the config says the model has it)")

    def get(self, name: str, aliases=()) -> torch.Tensor:
        name = self.resolve(name, aliases)
        return self._handles[self.weight_map[name]].get_tensor(name)


class HFWriter:
    """Tensors written in order into safetensors shards of at most `max_shard_bytes` each."""

    def __init__(self, directory: Path, max_shard_bytes: int = 5 * 2**30):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: Dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: List[List[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        number = len(self._shards) + 1
        save_file(self._pending, str(self.dir / f".shard-{number:05d}.safetensors"), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> Optional[Path]:
        """Write the last shard; name the shards model-0000i-of-0000n (or model.safetensors) and
        write the index. Returns the index path (None for a single file)."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            os.replace(self.dir / ".shard-00001.safetensors", self.dir / SINGLE)
            return None
        weight_map = {}
        for i, names in enumerate(self._shards, start=1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / f".shard-{i:05d}.safetensors", self.dir / final)
            weight_map.update({name: final for name in names})
        index = self.dir / INDEX
        index.write_text(json.dumps({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map},
                                    indent=2) + "\n")
        return index
