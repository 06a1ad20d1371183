"""Configuration of Kimi Linear with Block Attention Residuals (model_type "kimi_linear_attnres").

Written by attnres-train into every export of an AttnRes model, beside the modeling file, so that
`AutoConfig.from_pretrained(dir, trust_remote_code=True)` reads it with transformers alone.

Fields added to transformers' KimiLinearConfig:
    attn_res_mode: "block" (Block AttnRes) or "full" (every sublayer output is its own source).
    attn_res_block_size_sublayers: sublayers per block (attention and FFN each count one); 1 for
        "full".
"""

from huggingface_hub.dataclasses import strict
from transformers.models.kimi_linear.configuration_kimi_linear import KimiLinearConfig

ATTN_RES_MODES = ("block", "full")


@strict
class KimiLinearAttnResConfig(KimiLinearConfig):
    model_type = "kimi_linear_attnres"

    attn_res_mode: str = "block"
    attn_res_block_size_sublayers: int = 2

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.attn_res_mode not in ATTN_RES_MODES:
            raise ValueError(f"attn_res_mode={self.attn_res_mode!r}: expected one of {ATTN_RES_MODES}")
        if self.attn_res_mode == "full":
            self.attn_res_block_size_sublayers = 1
        if self.attn_res_block_size_sublayers < 1:
            raise ValueError(f"attn_res_block_size_sublayers={self.attn_res_block_size_sublayers}: must be >= 1")


__all__ = ["KimiLinearAttnResConfig"]
