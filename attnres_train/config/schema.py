"""Config dataclasses. Hydra fills them from `configs/` and command-line overrides.

Each group is stored in hydra's ConfigStore as `base_<group>`; the YAML files under `configs/<group>/`
extend it through their defaults list, so an unknown key is an error (struct mode).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

RESIDUAL_MODES = ("standard", "full", "block")


@dataclass
class AttnResConfig:
    # Sublayers per block (each attention and each FFN is one sublayer); the last block may be
    # shorter. Ignored for residual=standard; residual=full means block_size=1.
    block_size: int = 2
    # "two_phase": batched inter-block pass + online-softmax merge (default, exact).
    # "naive": one softmax over all sources per sublayer (reference).
    impl: str = "two_phase"


@dataclass
class KDAConfig:
    num_heads: int = 2
    head_dim: Optional[int] = None  # None: hidden_size // num_heads (must divide)
    conv_kernel: int = 4
    chunk_size: int = 64
    impl: str = "auto"  # auto (fla on CUDA when installed, else chunk) | chunk | recurrent | fla


@dataclass
class MLAConfig:
    num_heads: int = 2
    q_lora_rank: Optional[int] = None  # None: direct query projection (Kimi)
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16  # computed but never rotated (NoPE)
    v_head_dim: int = 32


@dataclass
class MoEConfig:
    num_experts: int = 16
    top_k: int = 4
    ffn_hidden_size: int = 64  # per routed expert
    num_shared_experts: int = 1  # ungated, width num_shared_experts * ffn_hidden_size
    first_k_dense: int = 1  # leading layers with a dense FFN
    dense_ffn_hidden_size: int = 320
    routed_scaling_factor: float = 1.0
    score_function: str = "sigmoid"
    # Aux-loss-free balancing: the selection-only expert bias moves by this much per step.
    bias_update_rate: float = 1e-3
    aux_loss_coeff: float = 0.0


@dataclass
class ModelConfig:
    name: str = "tiny"
    residual: str = "block"  # standard | full | block
    attnres: AttnResConfig = field(default_factory=AttnResConfig)
    num_layers: int = 4
    # One letter per layer: K = KDA, M = NoPE MLA. Kimi's released pattern is [KKKM]x6 + KKM.
    layer_pattern: str = "KKKM"
    hidden_size: int = 128
    vocab_size: int = 4096
    seq_length: int = 64
    norm_eps: float = 1e-5
    init_std: float = 0.02
    kda: KDAConfig = field(default_factory=KDAConfig)
    mla: MLAConfig = field(default_factory=MLAConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    ep: int = 1


@dataclass
class TrainConfig:
    seed: int = 1234
    # Build the model on the meta device, print the parameter table, write plan.json, exit.
    dry_run: bool = False
    micro_batch_size: int = 4
    steps: int = 100
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="parallel", name="base_parallel", node=ParallelConfig)
    cs.store(group="train", name="base_train", node=TrainConfig)
