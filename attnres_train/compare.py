"""`attnres-train-compare RUN_DIR_A RUN_DIR_B [...]`: AttnRes vs baseline, side by side.

Prints a table (final / best val loss, median tokens/s, peak memory, steps; deltas against the
first run) and writes a PNG of the loss curves.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load_run(run_dir: Path) -> dict:
    metrics_file = run_dir / "metrics.jsonl"
    if not metrics_file.is_file():
        raise SystemExit(f"{run_dir}: no metrics.jsonl (is this an attnres-train run directory?)")
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    label = run_dir.name
    cfg_file = run_dir / "config.yaml"
    if cfg_file.is_file():
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(cfg_file)
        label = f"{cfg.model.name}/{cfg.model.residual}"
    val = [r["val_loss"] for r in metrics if "val_loss" in r]
    speeds = sorted(r["tokens_per_s"] for r in metrics if "tokens_per_s" in r)
    return {
        "dir": str(run_dir),
        "label": label,
        "metrics": metrics,
        "final_val_loss": val[-1] if val else None,
        "best_val_loss": min(val) if val else None,
        "tokens_per_s": speeds[len(speeds) // 2] if speeds else None,
        "peak_memory_bytes": summary.get("peak_memory_bytes"),
        "steps": max((r["step"] for r in metrics), default=0),
    }


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(runs: list) -> str:
    ref = runs[0]
    head = f"{'run':<28} {'final val':>10} {'best val':>10} {'Δ vs 1st':>9} {'tok/s':>10} {'Δ tok/s':>8} {'peak mem':>10} {'steps':>6}"
    lines = [head, "-" * len(head)]
    for r in runs:
        dval = (r["final_val_loss"] - ref["final_val_loss"]) if None not in (r["final_val_loss"], ref["final_val_loss"]) else None
        dspeed = (r["tokens_per_s"] / ref["tokens_per_s"] - 1) if r["tokens_per_s"] and ref["tokens_per_s"] else None
        mem = r["peak_memory_bytes"] / 2**20 if r["peak_memory_bytes"] else None
        lines.append(f"{r['label'][:28]:<28} {_fmt(r['final_val_loss'], '.4f'):>10} {_fmt(r['best_val_loss'], '.4f'):>10} "
                     f"{_fmt(dval, '+.4f'):>9} {_fmt(r['tokens_per_s'], ',.0f'):>10} {_fmt(dspeed, '+.1%'):>8} "
                     f"{_fmt(mem, ',.0f') + ' MiB' if mem else '-':>10} {r['steps']:>6}")
    return "\n".join(lines)


def plot(runs: list, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        train = [(m["step"], m["loss"]) for m in r["metrics"] if "loss" in m]
        val = [(m["step"], m["val_loss"]) for m in r["metrics"] if "val_loss" in m]
        line, = ax.plot(*zip(*train), label=f"{r['label']} train", alpha=0.8) if train else (None,)
        if val:
            ax.plot(*zip(*val), "o--", color=line.get_color() if line else None, label=f"{r['label']} val")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="loss curves")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="attnres-train-compare", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories (the first is the reference)")
    p.add_argument("--out", type=Path, default=Path("compare.png"), help="loss-curve PNG to write")
    args = p.parse_args(argv)
    runs = [load_run(d) for d in args.runs]
    print(table(runs))
    print(f"loss curves: {plot(runs, args.out)}")


if __name__ == "__main__":
    main(sys.argv[1:])
