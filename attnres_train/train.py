"""`attnres-train`: the hydra entry point.

    attnres-train model=kimi_linear_48b_a3b train.dry_run=true   # counts + plan.json, seconds
    attnres-train model=tiny model.residual=standard ...          # the baseline twin
"""

from __future__ import annotations

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from attnres_train import cpu_compat
from attnres_train.config import register_configs, validate_config

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")

register_configs()


def run(cfg, run_dir: Path) -> None:
    validate_config(cfg)
    cpu_compat.apply()
    from parallel.groups import destroy_distributed, init_distributed

    init_distributed(cfg.parallel)
    try:
        if cfg.train.dry_run:
            from attnres_train.plan import dry_run

            dry_run(cfg, run_dir)
        else:
            raise SystemExit(
                "training is not available yet in this build: use train.dry_run=true"
            )
    finally:
        destroy_distributed()


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    typed = OmegaConf.to_object(cfg)  # dataclass instances, validated types
    run(typed, Path(HydraConfig.get().runtime.output_dir))


def main() -> None:
    import torch

    if not torch.cuda.is_available():
        # Before any megatron import: its jit_fuser (torch.compile) is slower than eager on CPU.
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    _hydra_main()


if __name__ == "__main__":
    main()
