"""Composing the config outside a hydra run, and turning a refused override into one ConfigError.

hydra composes the config before any of our code runs; a value the schema refuses (a bad choice,
a string for an int) then ends in hydra's multi-line report. :func:`check_overrides` composes the
same overrides first, so the entry point can print one line naming the key and the allowed
values instead (what `attnres-train model.residual=bogus` shows).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from attnres_train.config.schema import Config, register_configs
from attnres_train.errors import ConfigError

#: the packaged YAML configs (config.yaml and one folder per group)
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")

_CHOICES = re.compile(r"expected one of \[(.*)\]")


def compose_config(overrides: Sequence[str] = (), config_dir: str = CONFIG_DIR) -> Config:
    """The typed config `attnres-train OVERRIDES...` would run with (no hydra run dir, no job)."""
    register_configs()
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="config", overrides=list(overrides)))


def check_overrides(args: Sequence[str], config_dir: str = CONFIG_DIR) -> None:
    """Raise ConfigError if the schema refuses a value among the command-line ``args``.

    Only values are judged here; anything else (hydra flags such as --multirun, an unknown key, a
    missing config file, a sweep) is left for hydra to report as usual.
    """
    if any(a.startswith("-") for a in args):
        return
    try:
        compose_config(args, config_dir)
    except ConfigCompositionException as exc:
        error = refused_value(exc)
        if error is not None:
            raise error from None


def refused_value(exc: BaseException) -> Optional[ConfigError]:
    """The ConfigError for an omegaconf ValidationError in ``exc``'s cause chain, else None:
    a refused choice says which values are allowed, any other the first line of omegaconf's."""
    while exc is not None and not isinstance(exc, ValidationError):
        exc = exc.__cause__
    if not isinstance(exc, OmegaConfBaseException) or not getattr(exc, "full_key", None):
        return None
    message = str(getattr(exc, "msg", None) or exc).splitlines()[0]
    choices = _CHOICES.search(message)
    fix = f"use one of {choices.group(1)}" if choices else message
    return ConfigError(exc.full_key, exc.value, fix)
