"""attnres-train: Kimi-Linear-style MoE pretraining with Block Attention Residuals on megatron-core."""

from attnres_train import bootstrap as _bootstrap  # noqa: F401  (first: sets the environment megatron reads)

__version__ = "0.1.0"
