"""Import and export, in process, on the unsplit model (TP = PP = EP = 1).

Import: an HF directory -> our model's weights, saved as a weights-only distributed checkpoint
(`{"model": ...}`, the format of the unsplit initial weights), which megatron reshards onto any
TP / PP / EP / DP layout at load (`train.init_from`). Export: one of our checkpoints (a training
checkpoint of any layout, or an imported one) -> an HF directory that transformers loads.

Both walk `hf_weights.plan` entry by entry, so only one entry's tensors are converted at a time.
(The unsplit model itself is held in memory: see docs/convert.md for the sizes.)
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from megatron.core import dist_checkpointing

from attnres_train.checkpoint import META, STRATEGY, step_dirs
from attnres_train.config.schema import ModelConfig
from attnres_train.convert import hf_config, hf_weights
from attnres_train.convert.hf_files import CONFIG, HFFormatError, HFReader, HFWriter, read_config
from attnres_train.model.model import build_model

WEIGHTS_KIND = "weights"  # meta.json "kind" of a weights-only checkpoint (an import)


def our_state(model) -> dict:
    """The unsplit model's tensors by name (parameters and the router's expert_bias buffers)."""
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def fill_from_hf(model, cfg: ModelConfig, reader: HFReader, *, progress: Callable = lambda *_: None) -> list:
    """Copy an HF checkpoint's tensors into our unsplit `model` (built from `cfg`); returns the
    names of our tensors the checkpoint does not hold (AttnRes parameters of an import that adds
    AttnRes: they keep their initial values). Raises HFFormatError for a missing tensor or a
    shape that does not match the config."""
    layout = hf_weights.detect_layout(reader.names())
    mine = our_state(model)
    entries = hf_weights.plan(cfg, layout)
    kept = []
    with torch.no_grad():
        for i, entry in enumerate(entries):
            if _is_attnres(entry) and not all(n in reader.weight_map for n in entry.hf):
                kept += list(entry.ours)
                continue
            hf_tensors = [reader.get(n, hf_weights.aliases(n)) for n in entry.hf]
            for name, tensor in zip(entry.ours, entry.from_hf(hf_tensors)):
                target = mine[name]
                if tuple(target.shape) != tuple(tensor.shape):
                    raise HFFormatError(
                        f"{reader.dir}: {', '.join(entry.hf)} has shape {[tuple(t.shape) for t in hf_tensors]}, "
                        f"which does not match its config ({name} must be {tuple(target.shape)}): the config.json "
                        "and the weights disagree")
                target.copy_(tensor)
            progress(i + 1, len(entries))
    return kept


def _is_attnres(entry) -> bool:
    return all(n.split(".")[-2] in ("attn_res", "mlp_res", "final_res") for n in entry.ours)


def hf_tensors(model, cfg: ModelConfig, dtype: Optional[torch.dtype] = None):
    """(HF name, tensor) of our unsplit `model`, in the layout save_pretrained writes."""
    mine = our_state(model)
    for entry in hf_weights.plan(cfg, "remote_code"):
        for name, tensor in zip(entry.hf, entry.to_hf([mine[n] for n in entry.ours])):
            yield name, tensor if dtype is None else tensor.to(dtype)


def import_hf(hf_dir: Path, out: Path, *, residual: str = "standard", block_size: Optional[int] = None,
              dtype: torch.dtype = torch.float32, name: Optional[str] = None, log=print) -> dict:
    """An HF Kimi Linear directory -> a weights-only checkpoint at `out` (+ meta.json and the
    model config as YAML). Returns the meta dict. Needs the megatron groups of one process."""
    hf = read_config(hf_dir)
    cfg = hf_config.from_hf(hf, name=name or Path(hf_dir).name)
    if residual != "standard":
        cfg.residual = residual
        if block_size is not None:
            cfg.attnres.block_size = block_size
    reader = HFReader(Path(hf_dir))
    tic = time.perf_counter()
    model = build_model(cfg, params_dtype=dtype)
    kept = fill_from_hf(model, cfg, reader)
    if out.exists():
        raise FileExistsError(f"{out} exists: pick a new output directory (nothing is overwritten)")
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(tmp), sharded_strategy=STRATEGY)
    meta = {"kind": WEIGHTS_KIND, "source": str(hf_dir), "dtype": str(dtype).removeprefix("torch."),
            "model": dataclasses.asdict(cfg), "initialised_not_imported": kept}
    (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
    for tok in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tiktoken.model"):
        if (Path(hf_dir) / tok).is_file():
            shutil.copy2(Path(hf_dir) / tok, tmp / tok)
    tmp.rename(out)
    log(f"imported {hf_dir} -> {out} ({time.perf_counter() - tic:.1f} s; {len(reader.names())} HF tensors"
        + (f"; {len(kept)} AttnRes tensors initialised, not imported" if kept else "") + ")")
    return meta


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory of this project: `path` itself, or a run dir's newest checkpoint."""
    path = Path(path)
    if not (path / META).is_file() and (path / "checkpoints").is_dir():
        found = step_dirs(path / "checkpoints")
        if not found:
            raise FileNotFoundError(f"{path} holds no complete checkpoint under checkpoints/")
        path = found[-1]
    if not (path / META).is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint of this project ({META} is missing)")
    return path


def model_config_of(meta: dict) -> ModelConfig:
    """The ModelConfig a checkpoint's meta.json recorded."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), meta["model"]))


def load_our_weights(model, checkpoint: Path, meta: dict) -> None:
    """Load the weights of our checkpoint at `checkpoint` (a training checkpoint of any layout, or
    a weights-only import; `meta` its meta.json) into the unsplit `model`."""
    key = "model" if meta.get("kind") == WEIGHTS_KIND else "model0"
    loaded = dist_checkpointing.load({key: model.sharded_state_dict()}, str(checkpoint), sharded_strategy=STRATEGY)
    result = model.load_state_dict(loaded[key], strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing:
        raise RuntimeError(f"{checkpoint}: the checkpoint lacks {missing[:5]}")


def export_hf(checkpoint: Path, out: Path, *, dtype: Optional[torch.dtype] = None,
              max_shard_bytes: int = 5 * 2**30, tokenizer: Optional[Path] = None, log=print) -> Path:
    """One of our checkpoints -> an HF directory at `out` (config.json, safetensors shards +
    index, the tokenizer when given). Needs the megatron groups of one process."""
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: pick a new output directory")
    checkpoint = resolve_checkpoint(checkpoint)
    meta = json.loads((checkpoint / META).read_text())
    cfg = model_config_of(meta)
    tic = time.perf_counter()
    model = build_model(cfg, params_dtype=torch.float32)
    load_our_weights(model, checkpoint, meta)
    writer = HFWriter(out, max_shard_bytes=max_shard_bytes)
    for name, tensor in hf_tensors(model, cfg, dtype):
        writer.add(name, tensor)
    writer.close()
    out_dtype = str(dtype or torch.float32).removeprefix("torch.")
    (out / CONFIG).write_text(json.dumps(hf_config.to_hf(cfg, torch_dtype=out_dtype), indent=2) + "\n")
    if tokenizer is not None:
        shutil.copy2(tokenizer, out / "tokenizer.json")
    log(f"exported {checkpoint} -> {out} ({time.perf_counter() - tic:.1f} s, {writer.total_bytes / 2**20:.1f} MiB)")
    return out
