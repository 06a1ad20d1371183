"""Typed configs (hydra ConfigStore) and their validation."""

from attnres_train.config.schema import (
    AttnResConfig,
    Config,
    DataConfig,
    KDAConfig,
    MLAConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    TrainConfig,
    register_configs,
)
from attnres_train.config.validate import ConfigError, validate_config, validate_model

__all__ = [
    "AttnResConfig", "Config", "ConfigError", "DataConfig", "KDAConfig", "MLAConfig", "ModelConfig", "MoEConfig",
    "ParallelConfig", "TrainConfig", "register_configs", "validate_config", "validate_model",
]
