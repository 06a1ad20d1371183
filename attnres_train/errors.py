"""User-facing error types. This module imports nothing of the project, so every layer can raise them."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration mistake: `key` is the dotted config path (or the environment variable)."""

    def __init__(self, key: str, value: Any, fix: str):
        self.key, self.value, self.fix = key, value, fix
        super().__init__(f"{key}={value!r}: {fix}")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded (incomplete or corrupt), or saved (CheckpointSaveError)."""


class CheckpointSaveError(CheckpointError):
    """A checkpoint that could not be written (disk full, no permission): `path` is the checkpoint,
    `reason` the OS error, `fix` what to do. The older checkpoints are intact; the run stops."""

    def __init__(self, path: Any, reason: str, fix: str):
        self.path, self.reason, self.fix = path, reason, fix
        super().__init__(f"cannot save checkpoint {path}: {reason}. {fix}")


class TrainingDiverged(RuntimeError):
    """Training stopped: too many consecutive steps with a non-finite loss or gradient, or a model
    state that must not be checkpointed. The message names the step, the value and what to try."""
