"""Config dataclasses. Hydra fills them from `configs/` and command-line overrides.

Each group is stored in hydra's ConfigStore as `base_<group>`; the YAML files under `configs/<group>/`
extend it through their defaults list, so an unknown key is an error (struct mode).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

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
    vpp: int = 1  # virtual pipeline stages (model chunks) per pipeline rank: interleaved 1F1B
    ep: int = 1
    # Under AttnRes a pipeline hop carries only the block summaries the receiving rank lacks
    # (rank-local cache); false: every hop carries every block the receiver needs (naive scheme).
    attnres_cache: bool = True
    # Layers per pipeline chunk, in chunk order (virtual stage 0 of ranks 0..pp-1, then virtual
    # stage 1, ...); pp*vpp numbers summing to model.num_layers. Default: an even split. Use it
    # to give the first stage (embedding) and the last (LM head) fewer layers.
    layers_per_stage: Optional[List[int]] = None
    # Activation recomputation: none | selective (the modules in recompute_modules, megatron's
    # names: core_attn, mla_up_proj, layernorm, mlp, moe, shared_experts) | full (whole
    # layers, recompute_num_layers at a time; the AttnRes block state enters each group as inputs).
    recompute: str = "none"
    recompute_modules: List[str] = field(default_factory=lambda: ["core_attn"])
    recompute_num_layers: int = 1


@dataclass
class DataConfig:
    # Text (.txt: blank-line-separated documents), jsonl (one {"text": ...} per line) or prebuilt
    # megatron prefixes (PREFIX.bin + PREFIX.idx). Empty: the bundled tinyshakespeare corpus.
    paths: List[str] = field(default_factory=list)
    weights: Optional[List[float]] = None  # blend weights, one per path (default: equal)
    valid_paths: List[str] = field(default_factory=list)  # prebuilt prefixes only
    valid_fraction: float = 0.1  # text/jsonl: the last fraction (lines / records) is validation
    tokenizer: Optional[str] = None  # a tokenizer.json; None: train a byte-level BPE
    vocab_size: int = 4096  # of the BPE trained when data.tokenizer is None
    cache_dir: str = ".cache/data"


@dataclass
class TrainConfig:
    seed: int = 1234
    # Build the model on the meta device, print the parameter table, write plan.json, exit.
    dry_run: bool = False
    steps: int = 100
    micro_batch_size: int = 8
    global_batch_size: int = 32  # = micro_batch_size x data-parallel size x accumulation steps
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU | fp32 | bf16
    # Initialise every rank's model chunks with the weights the unsplit model gets from train.seed
    # (builds the whole model once per rank and reshards it through a distributed checkpoint under
    # the run dir): runs with different TP/PP/VPP/EP layouts start identical. For comparing layouts
    # at small scale.
    layout_independent_init: bool = False
    # AdamW with warmup, then cosine or WSD (warmup-stable-decay) down to min_lr
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 50
    lr_schedule: str = "cosine"  # cosine | wsd | constant
    wsd_decay_fraction: float = 0.2  # wsd: the final fraction of steps that decays
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    eval_interval: int = 100  # steps between validation passes (and one at the end)
    eval_batches: int = 0  # micro-batches per validation pass; 0: the whole valid split
    save_interval: int = 200  # steps between checkpoints (0: only at the end)
    keep_last: int = 2
    resume: str = "auto"  # auto: latest good checkpoint in the run dir | none | PATH


@dataclass
class WandbConfig:
    enabled: bool = True
    mode: str = "offline"  # offline | online | disabled
    project: str = "attnres-train"
    entity: Optional[str] = None


@dataclass
class LoggingConfig:
    log_interval: int = 10
    diag_interval: int = 50  # AttnRes/residual diagnostics (0: off)
    tensorboard: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="parallel", name="base_parallel", node=ParallelConfig)
    cs.store(group="data", name="base_data", node=DataConfig)
    cs.store(group="train", name="base_train", node=TrainConfig)
    cs.store(group="logging", name="base_logging", node=LoggingConfig)
