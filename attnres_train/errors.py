"""User-facing error types. This module imports nothing of the project, so every layer can raise them."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration mistake: `key` is the dotted config path (or the environment variable)."""

    def __init__(self, key: str, value: Any, fix: str):
        self.key, self.value, self.fix = key, value, fix
        super().__init__(f"{key}={value!r}: {fix}")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded (incomplete or corrupt)."""
