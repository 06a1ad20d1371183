"""The transformers model of our AttnRes checkpoints (transformers has no AttnRes).

Two self-contained files, importing only torch and transformers: they are copied into every
export of an AttnRes model and named in its config.json `auto_map`, so
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads it wherever transformers
is installed. In this process, `register()` makes the Auto classes know the model type without
trust_remote_code.

Exports of this model type use transformers' module layout of the Kimi Linear tensors (e.g.
`mlp.experts.gate_up_proj`): transformers renames the released remote-code names only for its
own `kimi_linear` type, not for custom code.
"""

from __future__ import annotations

import shutil
from pathlib import Path

HERE = Path(__file__).parent
CONFIG_FILE = "configuration_kimi_linear_attnres.py"
MODELING_FILE = "modeling_kimi_linear_attnres.py"
AUTO_MAP = {
    "AutoConfig": "configuration_kimi_linear_attnres.KimiLinearAttnResConfig",
    "AutoModel": "modeling_kimi_linear_attnres.KimiLinearAttnResModel",
    "AutoModelForCausalLM": "modeling_kimi_linear_attnres.KimiLinearAttnResForCausalLM",
}
MODEL_TYPE = "kimi_linear_attnres"  # KimiLinearAttnResConfig.model_type (the file stands alone)
ARCHITECTURE = "KimiLinearAttnResForCausalLM"


def write_code(out: Path) -> None:
    """Copy the configuration and modeling files into the export directory `out`."""
    for name in (CONFIG_FILE, MODELING_FILE):
        shutil.copy2(HERE / name, Path(out) / name)


def register() -> None:
    """Register the model type with AutoConfig, AutoModel and AutoModelForCausalLM (idempotent)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .configuration_kimi_linear_attnres import KimiLinearAttnResConfig
    from .modeling_kimi_linear_attnres import KimiLinearAttnResForCausalLM, KimiLinearAttnResModel

    AutoConfig.register(KimiLinearAttnResConfig.model_type, KimiLinearAttnResConfig, exist_ok=True)
    AutoModel.register(KimiLinearAttnResConfig, KimiLinearAttnResModel, exist_ok=True)
    AutoModelForCausalLM.register(KimiLinearAttnResConfig, KimiLinearAttnResForCausalLM, exist_ok=True)
