"""Benchmark of one Block-AttnRes block at the Kimi-Linear-48B shapes (not a test).

Simulated block: the last block of the 48B model, i.e. n = 9 completed sources
(b_0 = embedding + 8 completed block sums) and S = 6 sublayers, so the later sublayers attend
over 10 sources (9 blocks + the running partial sum). Sublayer outputs are fixed random tensors
(the sublayers themselves are not part of the measurement); they are added to the partial sum.

Variants (each produces the S sublayer inputs h_0..h_{S-1}; backward feeds fixed random
cotangents into them):
    residual   baseline: standard residual stream, h_{i+1} = h_i + out_i
    naive      attnres_naive per sublayer (plain autograd over the stacked sources)
    lean       attnres_lean per sublayer (memory-lean custom Function, no batching)
    two_phase  attnres_phase1 once for the block + attnres_merge per sublayer
    triton     two_phase on the fused Triton kernels (listed only on CUDA with triton installed)
    fla        flash-linear-attention's fused_attnres per sublayer (CUDA, where fla provides it)

Measured: forward and forward+backward wall time (median over --reps after --warmup), and
memory: on CUDA the peak allocation above the pre-existing tensors during fwd+bwd; on every
device the bytes of tensors saved for backward that are not the pre-existing inputs (blocks,
sublayer outputs, stream, queries), deduplicated by storage ("saved_bytes", recorded with
torch.autograd.graph.saved_tensors_hooks).

Usage:
    python -m bench.attnres_op --tokens 1024          # CPU, fp32 (make bench)
    python -m bench.attnres_op --tokens 16384         # CUDA, bf16

Run from the repository root: ``bench`` is a package there (tests import it as ``bench.attnres_op``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from attnres_train.model.attnres import (
    attnres_lean,
    attnres_merge,
    attnres_naive,
    attnres_phase1,
    triton_available,
)

REPO = Path(__file__).resolve().parents[1]
EPS = 1e-6


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return "cpu"


def _git_sha() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "uncommitted"
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "attnres_train/model/attnres",
         "bench/attnres_op.py"],
        cwd=REPO, capture_output=True, text=True,
    ).stdout.strip()
    return sha + ("-dirty" if dirty else "")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- variants
# Each takes the problem dict and returns the list of S sublayer inputs.


def run_residual(p):
    hidden, inputs = p["stream"], []
    for out in p["outs"]:
        inputs.append(hidden)
        hidden = hidden + out
    return inputs


def _per_sublayer(p, op):
    partial, inputs = None, []
    for i, out in enumerate(p["outs"]):
        sources = p["blocks"] if partial is None else p["blocks"] + [partial]
        inputs.append(op(sources, p["queries"][i], p["gammas"][i], EPS))
        partial = out if partial is None else partial + out
    return inputs


def run_naive(p):
    return _per_sublayer(p, attnres_naive)


def run_lean(p):
    return _per_sublayer(p, attnres_lean)


def run_two_phase(p, phase1=attnres_phase1, merge=attnres_merge):
    out, lse = phase1(p["blocks"], p["queries"], p["gammas"], EPS)
    outs, lses = out.unbind(0), lse.unbind(0)
    partial, inputs = None, []
    for i, sub_out in enumerate(p["outs"]):
        if partial is None:
            inputs.append(outs[i])
        else:
            inputs.append(
                merge(outs[i], lses[i], partial, p["queries"][i], p["gammas"][i], EPS)
            )
        partial = sub_out if partial is None else partial + sub_out
    return inputs


def run_triton(p):
    from attnres_train.model.attnres.triton_kernels import (
        attnres_merge_triton,
        attnres_phase1_triton,
    )

    return run_two_phase(p, attnres_phase1_triton, attnres_merge_triton)


VARIANTS = {
    "residual": run_residual,
    "naive": run_naive,
    "lean": run_lean,
    "two_phase": run_two_phase,
}
if torch.cuda.is_available() and triton_available():
    VARIANTS["triton"] = run_triton


def _fla_fused_attnres():
    """flash-linear-attention's single-query fused op (fla.ops.attnres, FLA PR #878), if installed."""
    try:
        from fla.ops.attnres import fused_attnres
    except Exception:
        return None
    return fused_attnres


def run_fla(p):
    """fla's fused_attnres per sublayer (it has no batched phase 1): the peer baseline. Its query
    and key-norm gain are separate arguments, like ours; the gain stays in the sources' dtype."""
    op = _fla_fused_attnres()

    def one(sources, query, gamma, eps):
        return op(query.to(sources[0].dtype), list(sources), gamma.to(sources[0].dtype), rms_eps=eps)

    return _per_sublayer(p, one)


if torch.cuda.is_available() and _fla_fused_attnres() is not None:
    VARIANTS["fla"] = run_fla


# --------------------------------------------------------------------------- measurement


def make_problem(args, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0, dt_=dtype):
        t = (scale * torch.randn(*shape, generator=g)).to(device=device, dtype=dt_)
        return t.requires_grad_()

    tok, dim = args.tokens, args.dim
    return {
        "blocks": [rand(tok, dim, scale=1.0 + j) for j in range(args.blocks)],
        "outs": [rand(tok, dim) for _ in range(args.sublayers)],
        "stream": rand(tok, dim),
        # small random queries so the softmax is non-trivial; params in fp32 (master weights)
        "queries": rand(args.sublayers, dim, scale=0.02, dt_=torch.float32),
        "gammas": torch.ones(args.sublayers, dim, device=device, requires_grad=True),
        "cots": [torch.randn(tok, dim, generator=g).to(device=device, dtype=dtype)
                 for _ in range(args.sublayers)],
    }


def _leaves(p):
    return p["blocks"] + p["outs"] + [p["stream"], p["queries"], p["gammas"]]


def fwd_bwd(fn, p):
    inputs = fn(p)
    leaves = _leaves(p)
    torch.autograd.grad(inputs, leaves, p["cots"], allow_unused=True)


def _once_ms(step, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def time_all(variants, p, device, warmup, reps):
    """Median fwd / fwd+bwd ms per variant. Reps are interleaved round-robin across variants so
    that background load on a shared machine hits every variant alike."""
    steps = {}
    for name, fn in variants.items():
        steps[name] = {
            "fwd_ms": (lambda fn=fn: fn(p)),
            "fwd_bwd_ms": (lambda fn=fn: fwd_bwd(fn, p)),
        }
    for _ in range(warmup):
        for pair in steps.values():
            for step in pair.values():
                step()
    times = {name: {k: [] for k in pair} for name, pair in steps.items()}
    for _ in range(reps):
        for name, pair in steps.items():
            for key, step in pair.items():
                times[name][key].append(_once_ms(step, device))
    return {name: {k: statistics.median(v) for k, v in d.items()} for name, d in times.items()}


def saved_bytes(fn, p):
    """Bytes of storages packed for backward, excluding the pre-existing leaf tensors."""
    existing = {t.untyped_storage().data_ptr() for t in _leaves(p)}
    storages: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in existing:
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        inputs = fn(p)
    del inputs
    return sum(storages.values())


def cuda_peak_bytes(fn, p, device):
    _sync(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fwd_bwd(fn, p)
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - base


# HBM peak bandwidth of the devices we benchmark on (vendor figures, bytes/s)
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H100": 3.35e12,
                  "A100-SXM4-80GB": 2.04e12, "A100": 1.56e12}

PRESETS = {  # --preset: (completed sources incl. embedding, sublayers per block)
    "kimi48b": (9, 6),  # the last block of Kimi-Linear-48B: 27 layers = 54 sublayers, S=6
    "paper": (8, 16),   # the paper's L=128 sublayers, N=8 blocks of S=16: the last block
}


def peak_bandwidth(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, bw in PEAK_BANDWIDTH.items():
        if key in name:
            return bw
    return None


def min_traffic_bytes(args, itemsize: int) -> dict:
    """The two-phase schedule's minimum memory traffic for one block (a lower bound for every
    variant; achieved bandwidth = this / time). Forward: read the n completed sources once
    (phase 1), write the S phase-1 outputs, then per sublayer read o_i and the partial sum and
    write h_i: (n + 4S)·T·D. Backward reads each forward tensor again and writes the gradients of
    the n sources, the S outputs and the partials: counted as twice the forward, a rough bound."""
    act = args.tokens * args.dim * itemsize
    fwd = (args.blocks + 4 * args.sublayers) * act
    return {"fwd_ms": fwd, "fwd_bwd_ms": 3 * fwd}


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per micro-batch (S*B)")
    ap.add_argument("--dim", type=int, default=2304, help="hidden size D (48B: 2304)")
    ap.add_argument("--blocks", type=int, default=9, help="completed sources incl. embedding")
    ap.add_argument("--sublayers", type=int, default=6, help="sublayers per block (48B: 6)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="set --blocks/--sublayers: kimi48b (9, 6) or paper (L=128, N=8, S=16: 8, 16)")
    ap.add_argument("--name", default=None, help="result file stem (default attnres_op_<device>_<date>)")
    args = ap.parse_args(argv)
    if args.preset:
        args.blocks, args.sublayers = PRESETS[args.preset]

    device = torch.device(args.device)
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    p = make_problem(args, device, dtype)
    act_bytes = args.tokens * args.dim * dtype.itemsize  # one [T, D] activation

    if args.threads:
        torch.set_num_threads(args.threads)
    variants = {name: VARIANTS[name] for name in args.variants.split(",")}
    if device.type != "cuda":  # the compiled Triton kernels need CUDA tensors
        variants.pop("triton", None)
    load_before = os.getloadavg()
    results = time_all(variants, p, device, args.warmup, args.reps)
    load_after = os.getloadavg()
    for name, fn in variants.items():
        res = results[name]
        res["saved_bytes"] = saved_bytes(fn, p)
        res["saved_activations"] = res["saved_bytes"] / act_bytes
        if device.type == "cuda":
            res["peak_bytes"] = cuda_peak_bytes(fn, p, device)
        traffic = min_traffic_bytes(args, dtype.itemsize)
        for key in ("fwd_ms", "fwd_bwd_ms"):
            gbs = traffic[key] / (res[key] / 1e3)
            res[key.replace("_ms", "_bandwidth_bytes_per_s")] = gbs
            if peak_bandwidth(device):
                res[key.replace("_ms", "_bandwidth_fraction")] = gbs / peak_bandwidth(device)
        print(f"{name:10s} fwd {res['fwd_ms']:9.2f} ms  fwd+bwd {res['fwd_bwd_ms']:9.2f} ms  "
              f"saved {res['saved_bytes'] / 2**20:9.1f} MiB", flush=True)

    base = results.get("residual")
    for res in results.values():
        if base:
            res["fwd_ratio"] = res["fwd_ms"] / base["fwd_ms"]
            res["fwd_bwd_ratio"] = res["fwd_bwd_ms"] / base["fwd_bwd_ms"]
            if "peak_bytes" in res and base.get("peak_bytes"):
                res["peak_ratio"] = res["peak_bytes"] / base["peak_bytes"]

    now = dt.datetime.now()
    dev_name = _device_name(device)
    meta = {
        "device": dev_name,
        "device_type": device.type,
        "command": shlex.join(["python", "-m", "bench.attnres_op", *sys.argv[1:]]),
        "date": now.isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "git_sha": _git_sha(),
        "shapes": {
            "tokens": args.tokens, "dim": args.dim, "completed_blocks": args.blocks,
            "sublayers_per_block": args.sublayers, "max_sources": args.blocks + 1,
            "dtype": dtype_name,
        },
        "threads": torch.get_num_threads(),
        "loadavg_1m_before_after": [load_before[0], load_after[0]],
        "warmup": args.warmup,
        "reps": args.reps,
        "activation_bytes": act_bytes,
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "cpu"
    if device.type != "cpu":
        slug = re.sub(r"[^a-z0-9]+", "-", dev_name.lower()).strip("-")
    stem = out_dir / (args.name or f"attnres_op_{slug}_{now:%Y-%m-%d}")
    meta["peak_bandwidth_bytes_per_s"] = peak_bandwidth(device)
    meta["min_traffic_bytes"] = min_traffic_bytes(args, dtype.itemsize)
    stem.with_suffix(".json").write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")

    has_peak = device.type == "cuda"
    lines = [
        f"# AttnRes op benchmark ({dev_name})",
        "",
        f"- date: {meta['date']}, torch {meta['torch']}, git {meta['git_sha']}",
        f"- command: `{meta['command']}`",
        f"- shapes: T={args.tokens} tokens, D={args.dim}, {args.blocks} completed sources "
        f"(embedding + {args.blocks - 1} blocks), S={args.sublayers} sublayers per block "
        f"(up to {args.blocks + 1} sources), {dtype_name}",
        f"- timing: median of {args.reps} reps (interleaved across variants) after "
        f"{args.warmup} warm-up; one block, sublayer outputs are fixed random tensors; "
        f"{torch.get_num_threads()} threads, 1-min load average {load_before[0]:.2f} before / "
        f"{load_after[0]:.2f} after",
        "- saved: bytes saved for backward beyond the pre-existing inputs, also in units of one "
        f"[T, D] activation ({act_bytes / 2**20:.1f} MiB). The AttnRes variants all save the "
        f"{max(args.sublayers - 2, 0)} new partial sums; two_phase also saves the phase-1 output "
        f"o ([S, T, D], {args.sublayers} activations) for the merges' backward; naive saves the "
        "stacked sources and normalised keys per sublayer",
        "",
        "- bandwidth: the two-phase schedule's minimum traffic ((n + 4S)·T·D forward, x3 with "
        "backward) over the time" + (f"; % of the device's {peak_bandwidth(device) / 1e12:.2f} TB/s HBM peak"
                                      if peak_bandwidth(device) else ""),
        "",
        "| variant | fwd ms | fwd+bwd ms | fwd × res | fwd+bwd × res | saved MiB | saved (acts) |"
        " fwd GB/s | fwd+bwd GB/s |" + (" peak MiB | peak × res |" if has_peak else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if has_peak else ""),
    ]
    for name, r in results.items():
        row = (f"| {name} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | "
               f"{r.get('fwd_ratio', float('nan')):.2f} | "
               f"{r.get('fwd_bwd_ratio', float('nan')):.2f} | "
               f"{r['saved_bytes'] / 2**20:.1f} | {r['saved_activations']:.2f} | "
               + " | ".join(f"{r[k + '_bandwidth_bytes_per_s'] / 1e9:,.0f}"
                            + (f" ({r[k + '_bandwidth_fraction']:.0%})" if k + "_bandwidth_fraction" in r else "")
                            for k in ("fwd", "fwd_bwd")) + " |")
        if has_peak:
            row += f" {r['peak_bytes'] / 2**20:.1f} | {r.get('peak_ratio', float('nan')):.2f} |"
        lines.append(row)
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
