"""Tile sweep of the fused Triton AttnRes kernels (not a test).

Each kernel has one tile, ``(BLOCK_T, BLOCK_D, num_warps)``, set in
``attnres_train/model/attnres/triton_kernels.py`` (``FWD_TILE``, ``BWD_TILE``, ``MERGE_TILE``).
This script tries every candidate tile of each kernel at the given shapes:

    phase1_fwd   the batched inter-block pass, forward          (FWD_TILE)
    phase1_bwd   its backward (keys recomputed), given a forward (BWD_TILE)
    merge        the per-sublayer merge, forward + backward      (MERGE_TILE, shared by both)

Every candidate's results are checked against the torch two-phase op evaluated in fp32 on the same
inputs (a tile that compiles but computes wrong is reported and never picked); on CUDA each is
timed with ``triton.testing.do_bench`` (median ms). Written: ``bench/results/<name>.json`` and a
table ``<name>.md`` with the device, the command and the date, and the fastest correct tile per
kernel, to be copied into triton_kernels.py.

    python -m bench.triton_tiles --preset kimi48b --tokens 16384      # on the GPU (make gpu-bench)
    TRITON_INTERPRET=1 python -m bench.triton_tiles --quick --tokens 6 --dim 40 --no-write  # CPU check
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
from pathlib import Path

import torch

from attnres_train.model.attnres import attnres_merge, attnres_phase1
from bench.attnres_op import PRESETS, _device_name, _git_sha

BENCH = Path(__file__).resolve().parent

EPS = 1e-6

#: every tile tried per kernel: BLOCK_T x BLOCK_D x num_warps
CANDIDATES = {
    "phase1_fwd": [(t, d, w) for t in (8, 16, 32) for d in (32, 64, 128) for w in (4, 8)],
    "phase1_bwd": [(t, d, w) for t in (8, 16, 32) for d in (32, 64, 128) for w in (4, 8)],
    "merge": [(t, d, w) for t in (4, 8, 16, 32) for d in (64, 128, 256) for w in (2, 4, 8)],
}
#: --quick: the current default plus one other tile per kernel (the CPU interpreter check)
QUICK = {
    "phase1_fwd": [(16, 64, 8), (8, 32, 4)],
    "phase1_bwd": [(16, 32, 8), (8, 64, 4)],
    "merge": [(8, 128, 4), (4, 64, 2)],
}
#: relative error (max |x - ref| / max |ref|) a correct tile stays within, per input dtype
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
TILE_ATTR = {"phase1_fwd": "FWD_TILE", "phase1_bwd": "BWD_TILE", "merge": "MERGE_TILE"}


def make_problem(tokens: int, dim: int, blocks: int, sublayers: int, device, dtype) -> dict:
    """Inputs of one block's two phases: ``blocks`` completed sources ``[tokens, dim]``, S queries
    and key-norm gains (fp32 params), a partial sum, cotangents; all ``requires_grad`` where the
    kernels produce gradients."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0, dtype_=dtype, grad=True):
        t = (scale * torch.randn(*shape, generator=gen)).to(device=device, dtype=dtype_)
        return t.requires_grad_(grad)

    return {
        "blocks": [rand(tokens, dim, scale=1.0 + j) for j in range(blocks)],
        "queries": rand(sublayers, dim, scale=0.05, dtype_=torch.float32),
        "gammas": (1 + rand(sublayers, dim, scale=0.1, dtype_=torch.float32, grad=False))
        .requires_grad_(),
        "partial": rand(tokens, dim),
        "cot_out": rand(sublayers, tokens, dim, grad=False),
        "cot_lse": rand(sublayers, tokens, dtype_=torch.float32, grad=False),
        "cot_h": rand(tokens, dim, grad=False),
    }


def _f32(p: dict) -> dict:
    """The same problem in fp32 (leaves detached and re-marked), for the reference."""
    out = {}
    for k, v in p.items():
        if isinstance(v, list):
            out[k] = [x.detach().float().requires_grad_() for x in v]
        else:
            out[k] = v.detach().float().requires_grad_(v.requires_grad)
    return out


def _phase1_leaves(p):
    return [*p["blocks"], p["queries"], p["gammas"]]


def _merge_inputs(p, phase1):
    """Sublayer 1's merge inputs (phase-1 row 1 as detached leaves, the partial sum)."""
    out, lse = phase1(p["blocks"], p["queries"], p["gammas"], EPS)
    return out[1].detach().requires_grad_(), lse[1].detach().requires_grad_()


def kernel_runs(kernel: str, p: dict, tk):
    """``(run, results)``: ``run()`` executes the kernel under test once (what is timed);
    ``results()`` runs it and returns the tensors to check (outputs or gradients)."""
    if kernel == "phase1_fwd":
        def run():
            return tk.attnres_phase1_triton(p["blocks"], p["queries"], p["gammas"], EPS)

        return run, lambda: [t.detach() for t in run()]

    if kernel == "phase1_bwd":
        leaves = _phase1_leaves(p)

        def results():
            out, lse = tk.attnres_phase1_triton(p["blocks"], p["queries"], p["gammas"], EPS)
            return list(torch.autograd.grad((out, lse), leaves, (p["cot_out"], p["cot_lse"])))

        out, lse = tk.attnres_phase1_triton(p["blocks"], p["queries"], p["gammas"], EPS)

        def run():
            return torch.autograd.grad((out, lse), leaves, (p["cot_out"], p["cot_lse"]),
                                       retain_graph=True)

        return run, results

    if kernel == "merge":
        out1, lse1 = _merge_inputs(p, tk.attnres_phase1_triton)
        leaves = [out1, lse1, p["partial"], p["queries"], p["gammas"]]

        def run():
            h = tk.attnres_merge_triton(out1, lse1, p["partial"], p["queries"][1], p["gammas"][1],
                                        EPS)
            grads = torch.autograd.grad(h, leaves, p["cot_h"])
            return [h.detach(), *grads]

        return run, run
    raise ValueError(kernel)


def reference(kernel: str, p32: dict) -> list:
    """The torch two-phase op's results for ``kernel_runs(kernel, ...).results()``, in fp32."""
    if kernel == "phase1_fwd":
        return [t.detach() for t in attnres_phase1(p32["blocks"], p32["queries"], p32["gammas"], EPS)]
    if kernel == "phase1_bwd":
        out, lse = attnres_phase1(p32["blocks"], p32["queries"], p32["gammas"], EPS)
        return list(torch.autograd.grad((out, lse), _phase1_leaves(p32),
                                        (p32["cot_out"], p32["cot_lse"])))
    out1, lse1 = _merge_inputs(p32, attnres_phase1)
    leaves = [out1, lse1, p32["partial"], p32["queries"], p32["gammas"]]
    h = attnres_merge(out1, lse1, p32["partial"], p32["queries"][1], p32["gammas"][1], EPS)
    return [h.detach(), *torch.autograd.grad(h, leaves, p32["cot_h"])]


def rel_error(got: list, ref: list) -> float:
    worst = 0.0
    for g, r in zip(got, ref):
        scale = r.abs().max().item() or 1.0
        worst = max(worst, (g.float() - r).abs().max().item() / scale)
    return worst


def sweep(args) -> dict:
    import triton

    from attnres_train.model.attnres import triton_kernels as tk

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    p = make_problem(args.tokens, args.dim, args.blocks, args.sublayers, device, dtype)
    p32 = _f32(p)
    candidates = QUICK if args.quick else CANDIDATES
    timed = device.type == "cuda"
    kernels = {}
    for kernel in args.kernels:
        attr = TILE_ATTR[kernel]
        default = getattr(tk, attr)
        ref = reference(kernel, p32)
        rows = []
        for tile in candidates[kernel]:
            setattr(tk, attr, tile)
            row = {"tile": list(tile), "ok": False, "rel_error": None, "ms": None, "error": None}
            try:
                run, results = kernel_runs(kernel, p, tk)
                err = rel_error(results(), ref)
                row["rel_error"] = err
                row["ok"] = err <= TOLERANCE[dtype]
                if timed and row["ok"]:
                    row["ms"] = triton.testing.do_bench(run, warmup=args.warmup, rep=args.rep)
            except Exception as exc:  # a tile that does not compile or fit: reported, skipped
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            finally:
                setattr(tk, attr, default)
            rows.append(row)
            print(f"{kernel:11s} tile {tile}: ok={row['ok']} err={row['rel_error']} "
                  f"ms={row['ms']} {row['error'] or ''}", flush=True)
        good = [r for r in rows if r["ok"] and r["ms"] is not None]
        best = min(good, key=lambda r: r["ms"]) if good else None
        current = next((r for r in rows if tuple(r["tile"]) == tuple(default)), None)
        kernels[kernel] = {"attr": attr, "current": list(default), "rows": rows,
                           "best": best["tile"] if best else None,
                           "best_ms": best["ms"] if best else None,
                           "current_ms": current["ms"] if current else None}
    return kernels


def write(args, kernels: dict, argv: list) -> Path:
    device = torch.device(args.device)
    stem = Path(args.results_dir) / (args.name or f"triton_tiles_{dt.date.today().isoformat()}")
    meta = {
        "device": _device_name(device),
        "command": shlex.join(["python", "-m", "bench.triton_tiles", *argv]),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "git": _git_sha(),
        "torch": torch.__version__,
        "shapes": {"tokens": args.tokens, "dim": args.dim, "blocks": args.blocks,
                   "sublayers": args.sublayers, "dtype": args.dtype},
    }
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({**meta, "kernels": kernels}, indent=2) + "\n")
    lines = [f"# Triton AttnRes tile sweep — {meta['device']}", "",
             f"- command: `{meta['command']}`", f"- date: {meta['date']}, git {meta['git']}",
             f"- shapes: {meta['shapes']}", "",
             "| kernel | current tile | current ms | best tile | best ms | speed-up |",
             "|---|---|---|---|---|---|"]
    for name, k in kernels.items():
        speedup = (f"{k['current_ms'] / k['best_ms']:.2f}x"
                   if k["best_ms"] and k["current_ms"] else "n/a")
        lines.append(f"| {name} | {tuple(k['current'])} | {k['current_ms']} | "
                     f"{tuple(k['best']) if k['best'] else None} | {k['best_ms']} | {speedup} |")
    lines += ["", "Every tile tried (BLOCK_T, BLOCK_D, num_warps): rel. error vs the fp32 torch op, "
              "median ms:", ""]
    for name, k in kernels.items():
        cells = [f"{tuple(r['tile'])}: " + (f"{r['ms']:.4f} ms" if r["ms"] is not None else
                                             ("ok" if r["ok"] else f"FAIL {r['error'] or r['rel_error']}"))
                 for r in k["rows"]]
        lines.append(f"- {name}: " + "; ".join(cells))
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem


# ------------------------------------------------------------------------- offline compilation


def launch_tile(kernel: str, tile, sublayers: int, dim: int) -> tuple:
    """The tile triton_kernels.py launches ``kernel`` with when its tile setting is ``tile``."""
    from attnres_train.model.attnres import triton_kernels as tk

    if kernel.startswith("phase1"):
        return tk.phase1_launch_tile(tuple(tile), sublayers, dim)
    return tuple(tile[:1]) + (min(tile[1], tk._np2(dim)),) + tuple(tile[2:])


def _kernel_spec(kernel: str, tile, blocks: int, sublayers: int, dtype: torch.dtype):
    """``(jit function, signature, constexprs, num_warps)`` of one launch with exactly ``tile``
    (see :func:`launch_tile`), for ``triton.compile`` without a GPU."""
    import triton.language as tl

    from attnres_train.model.attnres import triton_kernels as tk

    x = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}[dtype]
    stat = "*fp32"
    block_t, block_d, warps = tile
    hint = 16 // torch.empty((), dtype=dtype).element_size()
    scalars = {"T": "i32", "D": "i32"}
    if kernel.startswith("phase1"):
        scalars.update(S="i32", n="i32")
    scalars["eps"] = "fp32"
    common = {"BLOCK_T": block_t, "BLOCK_D": block_d, "CDT": tl.float32}
    if kernel.startswith("phase1"):
        common.update(BLOCK_S=tk._np2(sublayers), BLOCK_N=tk._np2(blocks), HINT=hint)
    if kernel == "phase1_fwd":
        fn, ptrs = tk._phase1_fwd, dict(src_base=x, src_offs="*i64", w_ptr=stat, o_ptr=x,
                                       lse_ptr=stat)
    elif kernel == "phase1_bwd":
        fn, ptrs = tk._phase1_bwd, dict(src_base=x, src_offs="*i64", w_ptr=stat, go_ptr=x,
                                       glse_ptr=stat, gsrc_ptr=x, gw_ptr=stat)
        common.update(HAS_GO=True, HAS_GLSE=True)
    elif kernel == "merge_fwd":
        fn, ptrs = tk._merge_fwd, dict(o_ptr=x, lse_ptr=stat, p_ptr=x, w_ptr=stat, h_ptr=x)
    elif kernel == "merge_bwd":
        fn, ptrs = tk._merge_bwd, dict(o_ptr=x, lse_ptr=stat, p_ptr=x, w_ptr=stat, gh_ptr=x,
                                       go_ptr=x, glse_ptr=stat, gp_ptr=x, gw_ptr=stat)
    else:
        raise ValueError(kernel)
    signature = {**ptrs, **scalars, **{k: "constexpr" for k in common}}
    assert list(signature)[:len(ptrs) + len(scalars)] == fn.arg_names[:len(ptrs) + len(scalars)]
    return fn, signature, common, warps


def compile_resources(kernel: str, tile, *, arch: int, blocks: int, sublayers: int,
                      dtype: torch.dtype) -> dict:
    """Compile one kernel at one tile for ``sm_<arch>`` without a GPU (Triton's bundled ptxas)
    and read its resource use from the cubin: registers per thread, spill stack and local
    memory bytes (both 0 when nothing spills), static shared memory."""
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, signature, constexprs, warps = _kernel_spec(kernel, tile, blocks, sublayers, dtype)
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return {k.lower(): int(v) for k, v in fields.items()}


COMPILE_KERNELS = {"phase1_fwd": ["phase1_fwd"], "phase1_bwd": ["phase1_bwd"],
                   "merge": ["merge_fwd", "merge_bwd"]}


def compile_sweep(args) -> dict:
    """Every candidate tile compiled offline for ``sm_<args.compile_only>``: resource use per
    launched kernel (the merge tile serves its forward and backward kernels)."""
    dtype = getattr(torch, args.dtype)
    candidates = QUICK if args.quick else CANDIDATES
    out = {}
    for kernel in args.kernels:
        rows = []
        for tile in candidates[kernel]:
            launched_tile = launch_tile(kernel, tile, args.sublayers, args.dim)
            row = {"tile": list(tile), "launched_tile": list(launched_tile)}
            for launched in COMPILE_KERNELS[kernel]:
                try:
                    row[launched] = compile_resources(launched, launched_tile, arch=args.compile_only,
                                                      blocks=args.blocks,
                                                      sublayers=args.sublayers, dtype=dtype)
                except Exception as exc:  # reported, not fatal: the sweep goes on
                    row[launched] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            row["spills"] = any(r.get("stack", 0) or r.get("local", 0) or "error" in r
                                for k, r in row.items() if k in COMPILE_KERNELS[kernel])
            rows.append(row)
            print(f"{kernel:11s} tile {tile}: " + "; ".join(
                f"{k} {row[k]}" for k in COMPILE_KERNELS[kernel]), flush=True)
        out[kernel] = rows
    return out


def write_compile(args, report: dict, argv: list) -> Path:
    stem = Path(args.results_dir) / (
        args.name or f"triton_tiles_sm{args.compile_only}_compile_{dt.date.today().isoformat()}")
    import triton

    meta = {
        "device": f"none: compiled offline for sm_{args.compile_only} (Triton {triton.__version__}, "
                  "bundled ptxas)",
        "command": shlex.join(["python", "-m", "bench.triton_tiles", *argv]),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "git": _git_sha(),
        "shapes": {"dim": args.dim, "blocks": args.blocks, "sublayers": args.sublayers,
                   "dtype": args.dtype},
    }
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({**meta, "kernels": report}, indent=2) + "\n")
    from attnres_train.model.attnres import triton_kernels as tk

    lines = [f"# Triton AttnRes tiles compiled for sm_{args.compile_only} (no GPU: resource use only)",
             "", f"- {meta['device']}", f"- command: `{meta['command']}`",
             f"- date: {meta['date']}, git {meta['git']}", f"- shapes: {meta['shapes']}", "",
             "Registers per thread (255 max), spill stack / local bytes (0 = no spills), static "
             "shared bytes of the launch a tile setting gives (for S above "
             "`PHASE1_TILE_QUERIES` the phase-1 kernels shrink BLOCK_D). `*` marks the setting "
             "triton_kernels.py uses now. Timing needs the GPU (`python -m bench.triton_tiles` without "
             "`--compile-only`).", ""]
    for kernel, rows in report.items():
        current = tuple(getattr(tk, TILE_ATTR[kernel]))
        lines += [f"## {kernel}", "", "| tile setting (BLOCK_T, BLOCK_D, warps) | launched as | "
                  + " | ".join(f"{k}: regs / stack / local / shared" for k in COMPILE_KERNELS[kernel])
                  + " | spills |", "|---|---|" + "---|" * (len(COMPILE_KERNELS[kernel]) + 1)]
        for r in rows:
            cells = []
            for k in COMPILE_KERNELS[kernel]:
                u = r[k]
                cells.append(u["error"] if "error" in u else
                             f"{u['reg']} / {u['stack']} / {u['local']} / {u['shared']}")
            mark = " *" if tuple(r["tile"]) == current else ""
            lines.append(f"| {tuple(r['tile'])}{mark} | {tuple(r['launched_tile'])} | " + " | ".join(cells)
                         + f" | {'yes' if r['spills'] else 'no'} |")
        lines.append("")
    stem.with_suffix(".md").write_text("\n".join(lines))
    return stem


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="set --blocks/--sublayers (as bench.attnres_op)")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--dim", type=int, default=2304)
    ap.add_argument("--blocks", type=int, default=9, help="completed sources (incl. embedding)")
    ap.add_argument("--sublayers", type=int, default=6, help="queries of the block (S)")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 elsewhere")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--kernels", nargs="+", default=list(TILE_ATTR), choices=list(TILE_ATTR))
    ap.add_argument("--quick", action="store_true", help="two tiles per kernel (interpreter check)")
    ap.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    ap.add_argument("--rep", type=int, default=100, help="do_bench measurement, ms")
    ap.add_argument("--name", default=None, help="result file stem (default triton_tiles_<date>)")
    ap.add_argument("--results-dir", default=str(BENCH / "results"))
    ap.add_argument("--no-write", action="store_true", help="print only (and return the results)")
    ap.add_argument("--compile-only", type=int, default=None, metavar="ARCH",
                    help="no GPU needed: compile every candidate for sm_ARCH (e.g. 90) and report "
                         "registers and spills instead of timing (default dtype bfloat16)")
    args = ap.parse_args(argv)
    if args.preset:
        args.blocks, args.sublayers = PRESETS[args.preset]
    if args.compile_only is not None:
        args.dtype = args.dtype or "bfloat16"
        report = compile_sweep(args)
        if not args.no_write:
            stem = write_compile(args, report, argv)
            print(f"wrote {stem}.json and {stem}.md")
        return report
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    kernels = sweep(args)
    for name, k in kernels.items():
        print(f"{name}: current {tuple(k['current'])} {k['current_ms']} ms, best "
              f"{tuple(k['best']) if k['best'] else None} {k['best_ms']} ms  ({k['attr']})")
    if not args.no_write:
        stem = write(args, kernels, argv)
        print(f"wrote {stem}.json and {stem}.md")
    return kernels


if __name__ == "__main__":
    main()
