"""Conversion time and peak memory: attnres-train-convert import and export of a large model (not a test).

The model is the released Kimi-Linear-48B-A3B config (tests/convert/fixtures) cut to --layers
layers (the first dense, the last MLA, the rest KDA + 256-expert MoE), with random weights written
by transformers' save_pretrained in --dtype. Each step runs in its own process, which reports its
wall time and its peak resident memory (ru_maxrss); the table sets them against the bytes of the
model's tensors, so "bounded by one shard" (export) and "holds the model" (import) are numbers.

Usage:
    python -m bench.convert --layers 2 --dtype bfloat16 --work-dir /tmp/convert-bench
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "convert" / "fixtures" / "kimi_linear_48b_a3b_config.json"


def cut_config(layers: int) -> dict:
    hf = json.loads(FIXTURE.read_text())
    hf["num_hidden_layers"] = layers
    hf["linear_attn_config"] = {**hf["linear_attn_config"], "full_attn_layers": [layers],
                                "kda_layers": list(range(1, layers))}
    hf.pop("layer_types", None)
    hf.pop("mlp_layer_types", None)
    return hf


def make_hf(out: Path, layers: int, dtype: str) -> dict:
    import torch

    from attnres_train.convert.hf_runtime import modeling

    kimi = modeling()
    torch.set_default_dtype(getattr(torch, dtype))
    config = kimi.KimiLinearConfig(**cut_config(layers), experts_implementation="eager")
    model = kimi.KimiLinearForCausalLM(config)
    model.save_pretrained(out, max_shard_size="2GB")
    return {"params": sum(p.numel() for p in model.parameters())}


def step(name: str, args) -> dict:
    """One step in this process: its result, wall time and peak RSS."""
    tic = time.perf_counter()
    if name == "make_hf":
        info = make_hf(Path(args.work_dir) / "hf", args.layers, args.dtype)
    else:
        from attnres_train.convert import cli

        work = Path(args.work_dir)
        argv = (["import", str(work / "hf"), str(work / "ckpt"), "--dtype", args.dtype] if name == "import" else
                ["export", str(work / "ckpt"), str(work / "hf_out"), "--dtype", args.dtype,
                 "--max-shard-size", args.max_shard_size])
        cli.main(argv)
        info = {}
    return {**info, "seconds": time.perf_counter() - tic,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-shard-size", default="1GB")
    parser.add_argument("--work-dir", default="/tmp/convert-bench")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step:
        print(json.dumps(step(args.step, args)))
        return
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env_cmd = [sys.executable, "-m", "bench.convert", "--layers", str(args.layers), "--dtype", args.dtype,
               "--max-shard-size", args.max_shard_size, "--work-dir", str(work)]
    results = {}
    for name in ("make_hf", "import", "export"):
        proc = subprocess.run(env_cmd + ["--step", name], cwd=ROOT, capture_output=True, text=True,
                              env={"OMP_NUM_THREADS": "2", "TORCHDYNAMO_DISABLE": "1", "PYTHONPATH": str(ROOT),
                                   "PATH": "/usr/bin:/bin"})
        if proc.returncode:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(name, results[name], flush=True)
    model_bytes = dir_bytes(work / "hf")
    report = {
        "device": f"CPU ({platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores)",
        "command": "python -m bench.convert " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "date": dt.date.today().isoformat(), "layers": args.layers, "dtype": args.dtype,
        "params": results["make_hf"]["params"], "hf_bytes": model_bytes,
        "checkpoint_bytes": dir_bytes(work / "ckpt"), "export_bytes": dir_bytes(work / "hf_out"),
        "max_shard_size": args.max_shard_size, "steps": results,
    }
    stem = f"convert_kimi48b_{args.layers}layers_{args.dtype}_cpu_{report['date']}"
    out = Path(args.out)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    gib = 2**30
    rows = [f"| {name} | {r['seconds']:.1f} | {r['peak_rss_bytes'] / gib:.2f} | {r['peak_rss_bytes'] / model_bytes:.2f} |"
            for name, r in results.items()]
    (out / f"{stem}.md").write_text("\n".join([
        f"# Conversion of the 48B config cut to {args.layers} layers ({report['params']:,} parameters, {args.dtype})",
        "", f"Device: {report['device']}. Command: `{report['command']}`. Date: {report['date']}.",
        f"Model tensors: {model_bytes / gib:.2f} GiB; export shards of at most {args.max_shard_size}.", "",
        "| step | seconds | peak RSS (GiB) | peak RSS / model bytes |", "|---|---|---|---|", *rows, "",
        "make_hf: transformers builds the random model and save_pretrained writes it (the reference side).",
        "import holds the unsplit model in memory while megatron writes the checkpoint; export streams",
        "the checkpoint a batch at a time: about one shard, but never less than one checkpoint key (one",
        "MoE layer's experts, stacked).", ""]))
    print(f"wrote {out / stem}.json and .md")


if __name__ == "__main__":
    main()
