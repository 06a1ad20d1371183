"""A checkpoint of this project as a transformers model in memory (no export to disk)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from attnres_train.checkpoint import META, resolve_checkpoint
from attnres_train.choices import Residual
from attnres_train.config.schema import ModelConfig
from attnres_train.convert import hf_config
from attnres_train.convert.convert import (
    SPECIAL_TOKEN_IDS,
    find_tokenizer,
    hf_tokenizer,
    model_config_of,
    streamed_hf_tensors,
)


@dataclass
class Loaded:
    model: Any  # KimiLinearForCausalLM or KimiLinearAttnResForCausalLM, in eval mode
    tokenizer: Any  # a transformers tokenizer (None when the checkpoint has none)
    model_cfg: ModelConfig
    checkpoint: Path


def hf_config_object(cfg: ModelConfig, special_token_ids: dict, dtype: torch.dtype):
    """transformers' config object of our model (its class by the residual)."""
    from attnres_train.convert.hf_attnres.configuration_kimi_linear_attnres import KimiLinearAttnResConfig
    from attnres_train.convert.hf_runtime import modeling

    fields = hf_config.to_hf(cfg, torch_dtype=str(dtype).removeprefix("torch."),
                             **{k: special_token_ids.get(k) for k in SPECIAL_TOKEN_IDS})
    fields.pop("auto_map", None)
    fields.pop("torch_dtype")
    cls = modeling().KimiLinearConfig if cfg.residual == Residual.standard else KimiLinearAttnResConfig
    # the eager experts loop runs on every device and dtype (grouped_mm needs CUDA for some)
    return cls.from_dict({**fields, "dtype": str(dtype).removeprefix("torch.")},
                         experts_implementation="eager" if not torch.cuda.is_available() else None)


def load(path, *, dtype: torch.dtype = torch.float32, device: Optional[str] = None,
         tokenizer: Optional[Path] = None) -> Loaded:
    """The transformers model of the checkpoint at `path` (a checkpoint dir, or a run dir: its
    newest), with its tokenizer (the named one, else the run's or the import's). Needs the
    megatron groups of one process (the checkpoint is read through megatron)."""
    from attnres_train.convert.hf_attnres.modeling_kimi_linear_attnres import KimiLinearAttnResForCausalLM
    from attnres_train.convert.hf_runtime import modeling

    checkpoint = resolve_checkpoint(Path(path))
    meta = json.loads((checkpoint / META).read_text())
    cfg = model_config_of(meta)
    source = tokenizer or find_tokenizer(checkpoint)
    tok, ids = hf_tokenizer(source, model_max_length=cfg.seq_length) if source else (None, {})
    ids = {**ids, **{k: v for k, v in (meta.get("special_token_ids") or {}).items() if v is not None}}
    config = hf_config_object(cfg, ids, dtype)
    cls = modeling().KimiLinearForCausalLM if cfg.residual == Residual.standard else KimiLinearAttnResForCausalLM
    with torch.device("meta"):
        model = cls(config)
    state = dict(streamed_hf_tensors(cfg, checkpoint, batch_bytes=2**30, dtype=dtype, layout="transformers"))
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{checkpoint}: no value for {left[:5]} in the transformers model")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return Loaded(model.to(device).eval(), tok, cfg, checkpoint)
