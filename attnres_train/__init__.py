"""attnres-train: Kimi-Linear-style MoE pretraining with Block Attention Residuals on megatron-core."""

__version__ = "0.1.0"
