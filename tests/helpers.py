"""Test helpers: typed model configs read from configs/model/*.yaml (no hydra run), inputs."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from omegaconf import OmegaConf

from attnres_train.config.schema import ModelConfig

CONFIGS = Path(__file__).resolve().parent.parent / "attnres_train" / "configs"


def model_cfg(name: str, **overrides) -> ModelConfig:
    """configs/model/<name>.yaml as a ModelConfig, with dotted-key overrides."""
    yaml = OmegaConf.load(CONFIGS / f"model/{name}.yaml")
    yaml.pop("defaults")
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), yaml)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return OmegaConf.to_object(cfg)


def tiny_model_cfg(**overrides) -> ModelConfig:
    """The tiny family with a small vocabulary for fast tests."""
    return model_cfg("tiny", **{"vocab_size": 512, **overrides})


def with_residual(cfg: ModelConfig, residual: str) -> ModelConfig:
    cfg = copy.deepcopy(cfg)
    cfg.residual = residual
    return cfg


def tokens(cfg: ModelConfig, batch: int = 2, seq: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, seq or cfg.seq_length), generator=g)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    """[B, S, V] logits of a GPTModel-style model (megatron builds the causal mask)."""
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    return model(ids, pos, None)
