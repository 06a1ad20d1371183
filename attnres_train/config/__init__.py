"""Typed configs (hydra ConfigStore) and their validation.

The choice enums the configs use live in attnres_train.choices, which the model code imports
without this package. Composing outside a hydra run, and the one-line report of a refused override, is
attnres_train.config.compose (it imports hydra).
"""

from attnres_train.config.schema import (
    AttnResConfig,
    Config,
    DataConfig,
    KDAConfig,
    LoggingConfig,
    MLAConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    TrainConfig,
    WandbConfig,
    register_configs,
)
from attnres_train.config.validate import validate_config, validate_model
from attnres_train.errors import ConfigError

__all__ = [
    "AttnResConfig", "Config", "ConfigError", "DataConfig", "KDAConfig", "LoggingConfig", "MLAConfig",
    "ModelConfig", "MoEConfig", "ParallelConfig", "TrainConfig", "WandbConfig", "register_configs",
    "validate_config", "validate_model",
]
