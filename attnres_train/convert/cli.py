"""attnres-train-convert: Kimi Linear checkpoints in and out of this project.

    attnres-train-convert import HF_DIR OUT [--residual standard|block|full] [--block-size N]
    attnres-train-convert export CHECKPOINT_OR_RUN_DIR OUT [--dtype bfloat16] [--max-shard-size 5GB]
    attnres-train-convert config --hf-config PATH/config.json

`import` writes a weights-only distributed checkpoint that any layout loads (`train.init_from`);
`export` writes config.json + safetensors that transformers' KimiLinearForCausalLM loads; `config`
prints our model config and parameter counts for an HF config.json, without weights.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from attnres_train.convert.hf_config import UnsupportedConfig
from attnres_train.convert.hf_files import HFFormatError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)B?", text.strip(), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: a size such as 5GB, 500MB or 1048576")
    return int(float(m.group(1)) * 1024 ** "BKMGT".index((m.group(2) or "B").upper()))


class _ProgressBar:
    """A tqdm bar on stderr fed with progress(done, total) calls."""

    def __init__(self, what: str):
        self.what, self.bar = what, None

    def __enter__(self):
        return self

    def update(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.what, unit="entry", file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="attnres-train-convert", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="an HF Kimi Linear directory -> a weights-only checkpoint")
    imp.add_argument("hf_dir", type=Path)
    imp.add_argument("out", type=Path)
    imp.add_argument("--residual", choices=["standard", "block", "full"], default="standard",
                     help="block/full: add AttnRes (zero pseudo-queries: a uniform average over depth)")
    imp.add_argument("--block-size", type=int, default=None, help="sublayers per AttnRes block")
    imp.add_argument("--dtype", choices=list(DTYPES), default="float32")
    exp = sub.add_parser("export", help="one of our checkpoints -> an HF directory")
    exp.add_argument("checkpoint", type=Path, help="a checkpoint dir, or a run dir (its newest checkpoint)")
    exp.add_argument("out", type=Path)
    exp.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: as the checkpoint stores the weights")
    exp.add_argument("--max-shard-size", type=_bytes, default=_bytes("5GB"))
    exp.add_argument("--tokenizer", type=Path, default=None, help="a tokenizer.json to ship with the model")
    cfg = sub.add_parser("config", help="our model config and parameter counts for an HF config.json")
    cfg.add_argument("--hf-config", type=Path, required=True)
    return ap


def one_process():
    """The megatron groups of one process (TP = PP = EP = 1): conversions run on the unsplit model."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from attnres_train import cpu_compat
    from attnres_train.config.schema import ParallelConfig
    from parallel.groups import init_distributed

    cpu_compat.apply()
    init_distributed(ParallelConfig())
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)


def show_config(hf_config_path: Path) -> dict:
    """Print our ModelConfig (YAML) and the parameter table of an HF config.json; return the counts."""
    from omegaconf import OmegaConf

    from attnres_train.convert.hf_config import from_hf
    from attnres_train.convert.hf_files import read_config
    from attnres_train.model.counting import count_parameters, format_table
    from attnres_train.model.model import build_model

    cfg = from_hf(read_config(hf_config_path), name=hf_config_path.parent.name or "hf")
    print(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    counts = count_parameters(build_model(cfg, meta=True), cfg)
    print(format_table(counts))
    return counts


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    try:
        if args.command == "config":
            one_process()
            show_config(args.hf_config)
            return
        one_process()
        from attnres_train.convert.convert import export_hf, import_hf

        if args.command == "import":
            with _ProgressBar("import (tensors)") as bar:
                import_hf(args.hf_dir, args.out, residual=args.residual, block_size=args.block_size,
                          dtype=DTYPES[args.dtype], progress=bar.update)
        else:
            with _ProgressBar("export (tensors)") as bar:
                export_hf(args.checkpoint, args.out, dtype=DTYPES[args.dtype] if args.dtype else None,
                          max_shard_bytes=args.max_shard_size, tokenizer=args.tokenizer, progress=bar.update)
    except (UnsupportedConfig, HFFormatError, FileExistsError, FileNotFoundError) as exc:
        print(f"attnres-train-convert: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
