"""Config dataclasses. Hydra fills them from `attnres_train/configs/` and command-line overrides.

Each group is stored in hydra's ConfigStore as `base_<group>`; the YAML files under
`configs/<group>/` extend it through their defaults list, so an unknown key is an error (struct
mode), and a field typed with an enum of attnres_train.choices refuses any other value.

The defaults here are THE defaults: a YAML file holds only what differs from them. ModelConfig's
defaults are the tiny model (`model=tiny`, the CPU tests and `make train`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from attnres_train.choices import (
    AttnResImpl,
    AttnResKernel,
    DType,
    KDAImpl,
    LinearBackend,
    LRSchedule,
    Recompute,
    RecomputeModule,
    Residual,
    ScoreFunction,
    WandbMode,
)


@dataclass
class AttnResConfig:
    # Sublayers per block (each attention and each FFN is one sublayer); the last block may be
    # shorter. Ignored for residual=standard; residual=full means block_size=1.
    block_size: int = 2
    impl: AttnResImpl = AttnResImpl.two_phase
    # The two-phase op's kernels; auto: Triton for CUDA tensors when installed and its self-check
    # passes, else torch. The environment variable ATTNRES_KERNEL, when set, overrides it.
    kernel: AttnResKernel = AttnResKernel.auto


@dataclass
class KDAConfig:
    num_heads: int = 2
    head_dim: Optional[int] = 32  # None: hidden_size // num_heads (must divide)
    conv_kernel: int = 4
    chunk_size: int = 16  # fla's kernel needs 32 or 64 (impl=auto falls back to chunk otherwise)
    impl: KDAImpl = KDAImpl.auto


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
    score_function: ScoreFunction = ScoreFunction.sigmoid
    # Aux-loss-free balancing: the selection-only expert bias moves by this much per step.
    bias_update_rate: float = 1e-3
    aux_loss_coeff: float = 0.0


@dataclass
class ModelConfig:
    """The defaults are the tiny model: 4 layers, d=128, 8 sublayers in 4 blocks + the embedding."""

    name: str = "tiny"
    residual: Residual = Residual.block
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
    # Linears, norms and core attention: te (transformer-engine), local (megatron's own layers),
    # auto (te with CUDA and an importable transformer-engine, else local). The environment
    # variable ATTNRES_LINEAR, when set, overrides it. Same parameter names and shapes either way.
    linear: LinearBackend = LinearBackend.auto


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
    # Activation recomputation: selective recomputes the modules in recompute_modules; full
    # whole layers, recompute_num_layers at a time (the AttnRes block state enters each group as
    # inputs).
    recompute: Recompute = Recompute.none
    recompute_modules: List[RecomputeModule] = field(default_factory=lambda: [RecomputeModule.core_attn])
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
    # The world size the dry run plans for (data parallel = world / (tp * pp)); None: $WORLD_SIZE,
    # else 1. The environment variable ATTNRES_PLAN_WORLD_SIZE, when set, overrides it.
    dry_run_world_size: Optional[int] = None
    steps: int = 600
    micro_batch_size: int = 8
    global_batch_size: int = 32  # = micro_batch_size x data-parallel size x accumulation steps
    dtype: DType = DType.auto
    # Initialise every rank's model chunks with the weights the unsplit model gets from train.seed
    # (builds the whole model once per rank and reshards it through a distributed checkpoint under
    # the run dir): runs with different TP/PP/VPP/EP layouts start identical. For comparing layouts
    # at small scale.
    layout_independent_init: bool = False
    # AdamW with warmup, then cosine or WSD (warmup-stable-decay) down to min_lr
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 50
    lr_schedule: LRSchedule = LRSchedule.cosine
    wsd_decay_fraction: float = 0.2  # wsd: the final fraction of steps that decays
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    # A step whose loss or gradients are not finite (on any rank) skips its update; this many in a
    # row stop the run (exit code 1), its last good checkpoint kept.
    max_bad_steps: int = 3
    eval_interval: int = 100  # steps between validation passes (and one at the end)
    # micro-batches per validation pass, in all (split over data-parallel ranks); 0: the whole split
    eval_batches: int = 0
    save_interval: int = 200  # steps between checkpoints (0: only at the end)
    keep_last: int = 2
    # stop, checkpointed and with exit code 0, once the step count is a multiple of this (a job
    # that continues in several allocations, or on another layout); rerun to go on. 0: never
    exit_interval: int = 0
    resume: str = "auto"  # auto: latest good checkpoint in the run dir | none | PATH
    # A fresh start (nothing to resume) takes its weights from this checkpoint (an
    # `attnres-train-convert import`, a step_* directory or a run dir: its newest), on any layout;
    # optimizer, LR schedule and data position start fresh. None: initialise from train.seed.
    init_from: Optional[str] = None


@dataclass
class WandbConfig:
    enabled: bool = True
    mode: WandbMode = WandbMode.offline
    project: str = "attnres-train"
    entity: Optional[str] = None


@dataclass
class LoggingConfig:
    log_interval: int = 10
    diag_interval: int = 50  # AttnRes/residual diagnostics (0: off)
    tensorboard: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # The device's peak FLOP/s for the MFU estimate; None: a table of GPUs, measured on CPU. The
    # environment variable ATTNRES_PEAK_FLOPS, when set, overrides it.
    peak_flops: Optional[float] = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def register_configs() -> None:
    """Store the schema in hydra's ConfigStore (idempotent), before hydra composes."""
    # hydra is imported here, not at the top: the model code imports this package for its enums
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="parallel", name="base_parallel", node=ParallelConfig)
    cs.store(group="data", name="base_data", node=DataConfig)
    cs.store(group="train", name="base_train", node=TrainConfig)
    cs.store(group="logging", name="base_logging", node=LoggingConfig)
