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

from attnres_train.checkpoint import META, RUN_TOKENIZER, STRATEGY, resolve_checkpoint
from attnres_train.choices import Residual
from attnres_train.config.schema import ModelConfig
from attnres_train.convert import hf_attnres, hf_config, hf_weights
from attnres_train.convert.hf_files import CONFIG, HFFormatError, HFReader, HFWriter, read_config
from attnres_train.model.model import build_model

WEIGHTS_KIND = "weights"  # meta.json "kind" of a weights-only checkpoint (an import)
SPECIAL_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tiktoken.model")


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


def streamed_hf_tensors(cfg: ModelConfig, checkpoint: Path, *, batch_bytes: int, dtype: Optional[torch.dtype] = None,
                        progress: Callable = lambda *_: None, layout: Optional[str] = None):
    """(HF name, tensor) of the model in our checkpoint at `checkpoint`, in `layout` (default
    `export_layout(cfg)`), read a batch of plan entries at a time (about `batch_bytes` of our
    tensors, at least one entry).

    The model is built on the meta device only for its sharded state dict (which names each
    tensor's shards and their global shapes); each batch gives real (empty) buffers to the
    entries it reads and asks megatron for just those, so the whole model is never in memory."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from torch.distributed.checkpoint import FileSystemReader

    sharded = build_model(cfg, params_dtype=torch.float32, meta=True).sharded_state_dict()
    entries = hf_weights.plan(cfg, layout or export_layout(cfg))
    # buffers in the dtype the checkpoint holds (a bfloat16 run's weights are read as bfloat16)
    stored = {k: v.properties.dtype for k, v in FileSystemReader(str(checkpoint)).read_metadata()
              .state_dict_metadata.items() if hasattr(v, "properties")}

    def request(names):
        wanted = {}
        for name in names:
            item = sharded[name]
            assert isinstance(item, (ShardedTensor, ShardedTensorFactory)), (name, type(item))
            item.data = torch.empty(item.data.shape, dtype=stored.get(item.key, item.data.dtype))
            wanted[name] = item
        return wanted

    # megatron reads a checkpoint key (e.g. one layer's experts, stacked) with all its local shards
    # at once: a batch may end only where no key it touched is needed by a later entry
    last_use = {sharded[n].key: i for i, e in enumerate(entries) for n in e.ours}
    batch, size, done, open_until = [], 0, 0, -1
    for i, entry in enumerate(entries):
        batch.append(entry)
        size += sum(sharded[n].data.numel() * stored.get(sharded[n].key, torch.float32).itemsize for n in entry.ours)
        open_until = max([open_until] + [last_use[sharded[n].key] for n in entry.ours])
        if (size < batch_bytes or open_until > i) and i + 1 < len(entries):
            continue
        names = [n for e in batch for n in e.ours]
        loaded = dist_checkpointing.load({"model": request(names)}, str(checkpoint), sharded_strategy=STRATEGY)["model"]
        for e in batch:
            for name, tensor in zip(e.hf, e.to_hf([loaded[n] for n in e.ours])):
                yield name, tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)
        done += len(batch)
        progress(done, len(entries))
        del loaded
        for name in names:
            sharded[name].data = None  # this batch's buffers go
        batch, size = [], 0


def export_layout(cfg: ModelConfig) -> str:
    """The tensor layout of an export: the one transformers' save_pretrained writes for
    `kimi_linear` (the released names), and its module layout for our AttnRes model type
    (custom code gets no renaming when transformers loads it)."""
    return "remote_code" if cfg.residual == Residual.standard else "transformers"


def hf_tensors(model, cfg: ModelConfig, dtype: Optional[torch.dtype] = None):
    """(HF name, tensor) of our unsplit `model`, in the layout of `export_layout(cfg)`."""
    mine = our_state(model)
    for entry in hf_weights.plan(cfg, export_layout(cfg)):
        for name, tensor in zip(entry.hf, entry.to_hf([mine[n] for n in entry.ours])):
            yield name, tensor if dtype is None else tensor.to(dtype)


def import_hf(hf_dir: Path, out: Path, *, residual: str = "standard", block_size: Optional[int] = None,
              dtype: torch.dtype = torch.float32, name: Optional[str] = None, log=print,
              progress: Callable = lambda *_: None) -> dict:
    """An HF Kimi Linear directory -> a weights-only checkpoint at `out` (+ meta.json and the
    model config as YAML). Returns the meta dict. Needs the megatron groups of one process."""
    if out.exists():
        raise FileExistsError(f"{out} exists: pick a new output directory (nothing is overwritten)")
    hf = read_config(hf_dir)
    cfg = hf_config.from_hf(hf, name=name or Path(hf_dir).name)
    if residual != "standard":
        cfg.residual = residual
        if block_size is not None:
            cfg.attnres.block_size = block_size
    reader = HFReader(Path(hf_dir))
    tic = time.perf_counter()
    model = build_model(cfg, params_dtype=dtype, initialize=False)  # every tensor but AttnRes's is read
    kept = fill_from_hf(model, cfg, reader, progress=progress)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(tmp), sharded_strategy=STRATEGY)
    meta = {"kind": WEIGHTS_KIND, "source": str(hf_dir), "dtype": str(dtype).removeprefix("torch."),
            "model": dataclasses.asdict(cfg), "initialised_not_imported": kept,
            "special_token_ids": {k: hf.get(k) for k in SPECIAL_TOKEN_IDS}}
    (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
    for tok in TOKENIZER_FILES:
        if (Path(hf_dir) / tok).is_file():
            shutil.copy2(Path(hf_dir) / tok, tmp / tok)
    write_model_config(cfg, tmp, source=hf_dir)
    tmp.rename(out)
    log(f"imported {hf_dir} -> {out} ({time.perf_counter() - tic:.1f} s; {len(reader.names())} HF tensors"
        + (f"; {len(kept)} AttnRes tensors initialised, not imported" if kept else "") + ")")
    log("train from it: " + train_command(cfg, out))
    return meta


def write_model_config(cfg: ModelConfig, out: Path, *, source: Path) -> Path:
    """`out/model/<name>.yaml`: the model config group entry of `cfg`, so that
    `attnres-train --config-dir out model=<name>` builds this model."""
    from omegaconf import OmegaConf

    fields = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    path = out / "model" / f"{cfg.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# imported from {source}\ndefaults:\n  - base_model\n  - _self_\n\n{fields}")
    return path


def train_command(cfg: ModelConfig, checkpoint: Path) -> str:
    """The attnres-train command line that continues pretraining the import at `checkpoint`."""
    tokenizer = checkpoint / "tokenizer.json"
    return (f"attnres-train --config-dir {checkpoint} model={cfg.name} train.init_from={checkpoint}"
            + (f" data.tokenizer={tokenizer}" if tokenizer.is_file() else ""))


def model_config_of(meta: dict) -> ModelConfig:
    """The ModelConfig a checkpoint's meta.json recorded."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), meta["model"]))


def write_hf(model_or_tensors, cfg: ModelConfig, out: Path, *, dtype: Optional[torch.dtype] = None,
             max_shard_bytes: int = 5 * 2**30, tokenizer: Optional[Path] = None,
             special_token_ids: Optional[dict] = None) -> HFWriter:
    """Write our unsplit model (built from `cfg`), or the (HF name, tensor) pairs of one, as an
    HF directory at `out`: the tensors in shards + index, config.json, the AttnRes model's code for
    an AttnRes model, and the tokenizer (`write_tokenizer`) when given. Returns the closed writer
    (its byte count)."""
    tensors = model_or_tensors if not isinstance(model_or_tensors, torch.nn.Module) \
        else hf_tensors(model_or_tensors, cfg, dtype)
    writer = HFWriter(out, max_shard_bytes=max_shard_bytes)
    largest = (0, torch.float32)  # config.json's dtype: that of the largest tensor
    for name, tensor in tensors:
        writer.add(name, tensor)
        largest = max(largest, (tensor.numel(), tensor.dtype), key=lambda x: x[0])
    writer.close()
    ids = dict(special_token_ids or {})
    if tokenizer is not None:
        ids = {**write_tokenizer(tokenizer, out, model_max_length=cfg.seq_length), **ids}
    out_dtype = str(dtype or largest[1]).removeprefix("torch.")
    hf = hf_config.to_hf(cfg, torch_dtype=out_dtype, **{k: ids.get(k) for k in SPECIAL_TOKEN_IDS})
    (out / CONFIG).write_text(json.dumps(hf, indent=2) + "\n")
    if cfg.residual != Residual.standard:
        hf_attnres.write_code(out)
    return writer


def write_tokenizer(source: Path, out: Path, *, model_max_length: int) -> dict:
    """The tokenizer files of an export. `source`: a directory holding HF tokenizer files (an
    import's: copied as they are) or a tokenizers `tokenizer.json` (a run's BPE: `hf_tokenizer`).
    Returns the special token ids it defines."""
    source = Path(source)
    if source.is_dir():
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, out / name)
        return {}
    tok, ids = hf_tokenizer(source, model_max_length=model_max_length)
    tok.save_pretrained(out)
    return ids


def hf_tokenizer(source: Path, *, model_max_length: int):
    """(transformers tokenizer, its special token ids) of a tokenizer source: a directory of HF
    tokenizer files (AutoTokenizer), or a run's `tokenizer.json` wrapped in transformers'
    PreTrainedTokenizerFast with its end-of-document token as eos and pad, so that it encodes
    exactly as the run did."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from attnres_train.data.tokenizer import BPETokenizer

    source = Path(source)
    if source.is_dir():
        tok = AutoTokenizer.from_pretrained(source)
        return tok, {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
                     "bos_token_id": tok.bos_token_id}
    ours = BPETokenizer.from_file(source, key="tokenizer")
    eos = ours.id_to_token(ours.eod)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(source), eos_token=eos, pad_token=eos,
                                  model_max_length=model_max_length)
    return tok, {"eos_token_id": ours.eod, "pad_token_id": ours.eod}


def find_tokenizer(checkpoint: Path) -> Optional[Path]:
    """Where an export takes its tokenizer from when none is named: an import's own tokenizer
    files (in the checkpoint), else the tokenizer.json of the run the checkpoint belongs to."""
    if any((checkpoint / name).is_file() for name in TOKENIZER_FILES):
        return checkpoint
    run_tokenizer = checkpoint.parent.parent / RUN_TOKENIZER
    return run_tokenizer if checkpoint.parent.name == "checkpoints" and run_tokenizer.is_file() else None


def export_hf(checkpoint: Path, out: Path, *, dtype: Optional[torch.dtype] = None,
              max_shard_bytes: int = 5 * 2**30, tokenizer: Optional[Path] = None, log=print,
              progress: Callable = lambda *_: None) -> Path:
    """One of our checkpoints -> an HF directory at `out` (config.json, safetensors shards +
    index, the tokenizer: the named one, else `find_tokenizer`'s). Memory holds about one shard
    of tensors read and one written, not the model (`streamed_hf_tensors`). `progress(done,
    total)` is called after each batch of tensors. Needs the megatron groups of one process."""
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: pick a new output directory")
    checkpoint = resolve_checkpoint(checkpoint)
    meta = json.loads((checkpoint / META).read_text())
    cfg = model_config_of(meta)
    tic = time.perf_counter()
    tokenizer = tokenizer or find_tokenizer(checkpoint)
    tensors = streamed_hf_tensors(cfg, checkpoint, batch_bytes=max_shard_bytes, dtype=dtype, progress=progress)
    writer = write_hf(tensors, cfg, out, dtype=dtype, max_shard_bytes=max_shard_bytes, tokenizer=tokenizer,
                      special_token_ids=meta.get("special_token_ids"))
    log(f"exported {checkpoint} -> {out} ({time.perf_counter() - tic:.1f} s, {writer.total_bytes / 2**20:.1f} MiB"
        + (f"; tokenizer from {tokenizer}" if tokenizer else "; no tokenizer found: pass --tokenizer") + ")")
    return out
