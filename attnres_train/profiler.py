"""`attnres-train-profile`: AttnRes overhead against its plain-residual twin, measured in one command.

    attnres-train-profile model=tiny                                       # CPU, one process
    attnres-train-profile --nproc 4 parallel.pp=4 parallel.vpp=2 model=small  # pipeline, 4 ranks
    attnres-train-profile --name h100_small_pp4 --steps 20 model=small

Runs the baseline (model.residual=standard) and the AttnRes model (the config's residual) with the
same model, layout, data and seed, each in its own process group (so peak memory is per run), in
alternating order when --repeats > 1. Each run trains `--warmup` + `--steps` steps and reports the
median step time of the timed steps, tokens/s, MFU, peak memory, the p2p bytes the pipeline sent
per step, and (DeepSpeed's flops profiler, one extra step) a per-module forward time and FLOPs
breakdown. Results: bench/results/<name>.json and .md, naming device, command and date.

Byte units. All counts are for the whole job per optimizer step, forward + backward: tensors of
[s/tp, b, d] in the model dtype, x micro-batches x data-parallel replicas. `bytes_expected` is the
static layout's count (parallel/layout.py; full count: embedding hops and partial sums included),
`bytes_eq7` / `bytes_eq8` the paper's naive and cached schemes counted as the paper does
(non-embedding blocks only), `bytes_naive_full` the naive scheme's full count (Eq. 7 + the
embedding hops); the closed forms are defined for pipelines whose block boundaries fall on chunk
boundaries (else null).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from attnres_train.model.structure import LayerKind, layer_index, layer_kind
from attnres_train.run_logger import device_peak_flops
from parallel.layout import aligned_blocks_per_chunk, closed_forms


# -- the worker: one variant, run under torchrun (or plain python for one process) ------------------
def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {model} ({os.cpu_count()} cores visible)"


def classify(name: str, layers: Sequence[LayerKind]) -> str | None:
    """The breakdown row module `name` of a model chunk sends its forward time/FLOPs to (None:
    counted via its children). layers: the kind of each of the chunk's layers, by local index."""
    parts = name.split(".")
    if name == "embedding":
        return "embedding"
    if name == "output_layer":
        return "lm_head"
    if name == "decoder.final_layernorm" or parts[-1] in ("input_layernorm", "pre_mlp_layernorm"):
        return "norms"
    if len(parts) == 4 and parts[:2] == ["decoder", "layers"]:
        kind = layers[int(parts[2])]
        if parts[3] == "self_attention":
            return kind.attention  # "kda" | "mla"
        if parts[3] == "mlp":
            return "moe" if kind.is_moe else "dense_mlp"
    return None


def _tree_flops(module) -> int:
    """DeepSpeed keeps each module's own FLOPs in __flops__ (children excluded); its
    __duration__ is inclusive wall time."""
    return sum(int(getattr(m, "__flops__", 0)) for m in module.modules())


def module_breakdown(model_chunks) -> dict:
    """{row: {"flops", "time_s"}} from DeepSpeed's per-module counters (forward only). The rows
    not owned by a submodule (the decoder's own work: AttnRes mixing and partial sums, or the
    residual adds of the baseline's layers) are `decoder_self` = decoder − its counted parts."""
    rows: dict = {}

    def add(row, flops, dur):
        r = rows.setdefault(row, {"flops": 0, "time_s": 0.0})
        r["flops"] += int(flops)
        r["time_s"] += float(dur)

    for chunk in model_chunks:
        counted_flops, counted_time = 0, 0.0
        layers = [layer_kind(chunk.model_cfg, layer_index(layer)) for layer in chunk.decoder.layers]
        for name, module in chunk.named_modules():
            row = classify(name, layers)
            if row is None:
                continue
            flops, dur = _tree_flops(module), getattr(module, "__duration__", 0.0)
            add(row, flops, dur)
            if name.startswith("decoder."):
                counted_flops += flops
                counted_time += dur
        dec = chunk.decoder
        add("decoder_self", _tree_flops(dec) - counted_flops,
            max(getattr(dec, "__duration__", 0.0) - counted_time, 0.0))
    return rows


def run_variant(cfg, *, warmup: int, steps: int, flops: bool) -> dict:
    """Train warmup+steps steps (+1 profiled step) and measure; returns the record on rank 0."""
    # the worker's imports stay here: the orchestrator (`main`) imports this module too and never
    # builds a model, so it does not pay for importing megatron (seconds)
    import torch.distributed as dist

    from attnres_train.data.loader import MicroBatches
    from attnres_train.step import train_step
    from attnres_train.train import Throughput, build_training, peak_memory_bytes

    t, m = cfg.train, cfg.model
    total = warmup + steps + int(flops)
    run = build_training(cfg, train_samples=total * t.global_batch_size)
    batches = MicroBatches(run.train_ds, micro_batch_size=t.micro_batch_size, num_micro=run.num_micro,
                           dp_rank=run.dp_rank, dp_size=run.dp)
    comm = run.pipeline.comm
    times, step_bytes, losses = [], [], []

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dist.barrier()

    for step in range(warmup + steps):
        if step == warmup and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        before = sum(comm.bytes_sent.values())
        sync()
        tic = time.perf_counter()
        out = train_step(run.pipeline, run.state.optimizer, run.state.scheduler, batches.for_step(step))
        sync()
        if step >= warmup:
            times.append(time.perf_counter() - tic)
            step_bytes.append(sum(comm.bytes_sent.values()) - before)
            losses.append(out["loss"])
    peak_mem = peak_memory_bytes()

    breakdown = None
    if flops:
        breakdown = _profile_one_step(run, batches, warmup + steps)

    # job-wide numbers: bytes summed over ranks, memory max over ranks, breakdown per rank
    bytes_total = torch.tensor(step_bytes or [0], dtype=torch.float64)
    dist.all_reduce(bytes_total)
    mem = torch.tensor([peak_mem], dtype=torch.float64)
    dist.all_reduce(mem, op=dist.ReduceOp.MAX)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, breakdown)
    if dist.get_rank() != 0:
        return {}

    layout = run.layout
    tp = cfg.parallel.tp
    local_seq = m.seq_length // tp if tp > 1 else m.seq_length
    elem = torch.empty((), dtype=run.dtype).element_size()
    tensor_bytes = local_seq * t.micro_batch_size * m.hidden_size * elem
    per_tensor_step = tensor_bytes * run.num_micro * run.dp * 2  # x micro-batches x replicas x (fwd+bwd)
    median = statistics.median(times)
    meter = Throughput.for_run(cfg, run.counts)
    merged = None
    if flops:
        merged = {}
        for rank_rows in gathered:
            for row, v in (rank_rows or {}).items():
                r = merged.setdefault(row, {"flops": 0, "time_s": 0.0})
                r["flops"] += v["flops"]
                r["time_s"] += v["time_s"]
    return {
        "residual": m.residual,
        "step_times_s": times,
        "step_time_s": median,
        "tokens_per_s": meter.tokens_per_step / median,
        "mfu": meter.mfu(median),
        "peak_mem_bytes": int(mem.item()),
        "bytes_per_step": int(statistics.median(bytes_total.tolist())),
        "bytes_expected": layout.tensors_per_microbatch() * per_tensor_step if layout.pp > 1 else 0,
        "tensor_bytes": tensor_bytes,
        "per_tensor_step_bytes": per_tensor_step,
        "layout": {"pp": layout.pp, "vpp": layout.vpp, "layers": list(layout.layers),
                   "block_size": layout.block_size, "tensors_per_hop": layout.tensors_per_hop()},
        "world_size": dist.get_world_size(), "dp": run.dp, "num_micro": run.num_micro,
        "final_loss": losses[-1] if losses else None,
        "params_total": run.counts["params_total"],
        "breakdown": merged,
        "device": _device_name(),
    }


def _profile_one_step(run, batches, step: int) -> dict | None:
    """One more training step under DeepSpeed's flops profiler (forward counters per module)."""
    try:
        from deepspeed.profiling.flops_profiler import FlopsProfiler
    except Exception as exc:  # deepspeed is optional (installed by `make setup`)
        print(f"attnres-train-profile: no per-module breakdown ({type(exc).__name__}: {exc}); "
              "install deepspeed==0.19.8 with --no-build-isolation", file=sys.stderr)
        return None
    from attnres_train.step import train_step  # as in run_variant: the worker's imports

    profilers = [FlopsProfiler(chunk) for chunk in run.state.model_chunks]
    for p in profilers:
        p.start_profile()
    train_step(run.pipeline, run.state.optimizer, run.state.scheduler, batches.for_step(step))
    for p in profilers:
        p.stop_profile()
    rows = module_breakdown(run.state.model_chunks)
    for p in profilers:
        p.end_profile()
    return rows


def _worker_main(argv: list) -> None:
    """python -m attnres_train.profiler worker OUT_JSON WARMUP STEPS FLOPS [hydra overrides...]"""
    out, warmup, steps, flops, overrides = Path(argv[0]), int(argv[1]), int(argv[2]), argv[3] == "1", argv[4:]
    from attnres_train.config.compose import compose_config  # as in run_variant: the worker's imports
    from attnres_train.train import prepared_process

    cfg = compose_config(overrides)
    with prepared_process(cfg):  # validated, CPU patches applied, process groups held
        record = run_variant(cfg, warmup=warmup, steps=steps, flops=flops)
        if record:
            out.write_text(json.dumps(record, indent=2) + "\n")


# -- the orchestrator ------------------------------------------------------------------------------
def summarize(base: dict, attn: dict, *, command: str, name: str, repeats: list) -> dict:
    lay = attn["layout"]
    closed = closed_forms(lay["pp"], lay["vpp"], lay["layers"], lay["block_size"])
    per_tensor = attn["per_tensor_step_bytes"]

    def closed_bytes(form: str):  # a parallel.layout.ClosedForms field, whole job per step
        return None if closed is None else getattr(closed, form) * per_tensor

    # the overhead is the median of the per-pair ratios (each pair ran back to back), which
    # cancels slow drifts of the machine better than a ratio of two medians
    ratios = [r["attnres"] / r["baseline"] for r in repeats]
    return {
        "name": name,
        "device": attn["device"],
        "command": command,
        "date": _dt.date.today().isoformat(),
        "model": {"params_baseline": base["params_total"], "params_attnres": attn["params_total"],
                  "residual": attn["residual"]},
        "layout": lay,
        "world_size": attn["world_size"], "dp": attn["dp"], "num_micro": attn["num_micro"],
        "step_time_baseline_s": base["step_time_s"],
        "step_time_attnres_s": attn["step_time_s"],
        "overhead": statistics.median(ratios) - 1,
        "overhead_per_repeat": [r - 1 for r in ratios],
        "tokens_per_s_baseline": base["tokens_per_s"], "tokens_per_s_attnres": attn["tokens_per_s"],
        "mfu_baseline": base["mfu"], "mfu_attnres": attn["mfu"],
        "peak_mem_baseline_bytes": base["peak_mem_bytes"], "peak_mem_attnres_bytes": attn["peak_mem_bytes"],
        "bytes_per_step": attn["bytes_per_step"],
        "bytes_expected": attn["bytes_expected"],
        "bytes_eq7": closed_bytes("eq7"),
        "bytes_eq8": closed_bytes("eq8"),
        "bytes_naive_full": closed_bytes("naive_full"),
        "bytes_per_step_baseline": base["bytes_per_step"],
        "blocks_per_chunk": aligned_blocks_per_chunk(lay["layers"], lay["block_size"]),
        "final_loss_baseline": base["final_loss"], "final_loss_attnres": attn["final_loss"],
        "breakdown_baseline": base["breakdown"], "breakdown_attnres": attn["breakdown"],
        "step_times_baseline_s": base["step_times_s"], "step_times_attnres_s": attn["step_times_s"],
    }


def _mib(x) -> str:
    return "—" if x is None else f"{x / 2**20:,.2f} MiB"


def markdown(res: dict) -> str:
    lay = res["layout"]
    lines = [
        f"# AttnRes overhead: {res['name']}",
        "",
        f"- device: {res['device']}",
        f"- date: {res['date']}",
        f"- command: `{res['command']}`",
        f"- layout: pp={lay['pp']} vpp={lay['vpp']} layers/chunk={lay['layers']} block_size={lay['block_size']}"
        f" (N_p={res['blocks_per_chunk']}), world {res['world_size']}, dp {res['dp']}, {res['num_micro']} micro-batches/step",
        "",
        "| | baseline (standard residual) | AttnRes |",
        "|---|---:|---:|",
        f"| step time (median) | {res['step_time_baseline_s'] * 1e3:,.1f} ms | {res['step_time_attnres_s'] * 1e3:,.1f} ms |",
        f"| tokens/s | {res['tokens_per_s_baseline']:,.0f} | {res['tokens_per_s_attnres']:,.0f} |",
        f"| MFU | {res['mfu_baseline']:.2%} | {res['mfu_attnres']:.2%} |",
        f"| peak memory | {_mib(res['peak_mem_baseline_bytes'])} | {_mib(res['peak_mem_attnres_bytes'])} |",
        f"| p2p bytes / step (measured) | {_mib(res['bytes_per_step_baseline'])} | {_mib(res['bytes_per_step'])} |",
        "",
        f"**overhead = AttnRes / baseline − 1 = {res['overhead']:+.2%}** (median over back-to-back pairs)"
        + (f" (per repeat: {', '.join(f'{o:+.2%}' for o in res['overhead_per_repeat'])})"
           if len(res["overhead_per_repeat"]) > 1 else ""),
        "",
        "Pairs alternate their order (baseline first, then AttnRes first, ...): on a shared machine the"
        " second run of a pair can be slower, which the alternation and the median cancel.",
        "",
        "| p2p bytes per step (fwd+bwd, whole job) | |",
        "|---|---:|",
        f"| measured | {_mib(res['bytes_per_step'])} |",
        f"| expected from the layout (full count: embedding + partial) | {_mib(res['bytes_expected'])} |",
        f"| paper Eq. 8 (cached, non-embedding blocks) | {_mib(res['bytes_eq8'])} |",
        f"| paper Eq. 7 (naive, non-embedding blocks) | {_mib(res['bytes_eq7'])} |",
        f"| naive full count (Eq. 7 + embedding hops) | {_mib(res['bytes_naive_full'])} |",
    ]
    if res.get("breakdown_attnres"):
        rows = sorted(set(res["breakdown_attnres"]) | set(res["breakdown_baseline"] or {}))
        lines += ["", "Per-module forward time and FLOPs (DeepSpeed flops profiler, one step, all ranks summed;",
                  "`decoder_self` is the decoder's own work: AttnRes mixing and partial sums / residual adds):", "",
                  "| module | baseline time | AttnRes time | baseline GFLOPs | AttnRes GFLOPs |",
                  "|---|---:|---:|---:|---:|"]
        for row in rows:
            b = (res["breakdown_baseline"] or {}).get(row, {"flops": 0, "time_s": 0.0})
            a = res["breakdown_attnres"].get(row, {"flops": 0, "time_s": 0.0})
            lines.append(f"| {row} | {b['time_s'] * 1e3:,.1f} ms | {a['time_s'] * 1e3:,.1f} ms | "
                         f"{b['flops'] / 1e9:,.3f} | {a['flops'] / 1e9:,.3f} |")
    return "\n".join(lines) + "\n"


def _launch(nproc: int, args: list, env: dict, log: Path) -> None:
    if nproc == 1:
        cmd = [sys.executable, "-m", "attnres_train.profiler", "worker", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "attnres_train.profiler", "worker", *args]
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        raise SystemExit(f"attnres-train-profile: run failed ({proc.returncode}): {shlex.join(cmd)}\n{tail}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="attnres-train-profile", description=__doc__.split("\n\n")[0],
        epilog="Other arguments are hydra overrides for both runs (e.g. model=small parallel.pp=2).")
    parser.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun when > 1)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=1, help="baseline/AttnRes pairs, alternating order")
    parser.add_argument("--name", default=None, help="result file name (default: derived)")
    parser.add_argument("--out-dir", default=str(Path("bench") / "results"),
                        help="where <name>.json and .md go (default: bench/results under the current directory)")
    parser.add_argument("--no-flops", action="store_true", help="skip the per-module breakdown step")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (hydra overrides look like key=value)")
    if any(o.startswith("model.residual=standard") for o in overrides):
        parser.error("model.residual=standard is the baseline already: profile an AttnRes residual (block/full)")

    env = dict(os.environ)
    if not torch.cuda.is_available():  # the runs' processes share this machine's cores
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(args.nproc, 1))))
    # one peak for both runs (measured once here on CPU), so their MFUs differ only by their step times
    common = [f"logging.peak_flops={device_peak_flops()!r}", "logging.wandb.enabled=false", "logging.tensorboard=false", "logging.diag_interval=0",
              "train.eval_interval=0", f"train.steps={args.warmup + args.steps + 1}"]
    name = args.name or "profile_" + "_".join(o.replace("=", "-").replace(".", "-") for o in overrides)[:80] \
        + f"_{_dt.date.today().isoformat()}"
    command = shlex.join(["attnres-train-profile", *(argv if argv is not None else sys.argv[1:])])

    results: dict = {"baseline": [], "attnres": []}
    with tempfile.TemporaryDirectory(prefix="attnres-profile-") as tmp:
        for rep in range(args.repeats):
            order = ["baseline", "attnres"] if rep % 2 == 0 else ["attnres", "baseline"]
            for variant in order:
                out = Path(tmp) / f"{variant}-{rep}.json"
                extra = ["model.residual=standard"] if variant == "baseline" else []
                run_args = [str(out), str(args.warmup), str(args.steps), "0" if args.no_flops else "1",
                            *common, *overrides, *extra, f"hydra.run.dir={tmp}/{variant}-{rep}"]
                print(f"[{rep + 1}/{args.repeats}] {variant}: {args.warmup}+{args.steps} steps ...", flush=True)
                _launch(args.nproc, run_args, env, Path(tmp) / f"{variant}-{rep}.log")
                results[variant].append(json.loads(out.read_text()))
                print(f"    median step {results[variant][-1]['step_time_s'] * 1e3:,.1f} ms", flush=True)

    def pick(runs):  # the run with the median step time
        return sorted(runs, key=lambda r: r["step_time_s"])[len(runs) // 2]

    pairs = [{"baseline": b["step_time_s"], "attnres": a["step_time_s"]}
             for b, a in zip(results["baseline"], results["attnres"])]
    res = summarize(pick(results["baseline"]), pick(results["attnres"]), command=command, name=name,
                    repeats=pairs)
    if res["layout"]["pp"] > 1 and res["bytes_per_step"] != res["bytes_expected"]:
        print(f"WARNING: measured p2p bytes {res['bytes_per_step']} != layout's {res['bytes_expected']}",
              file=sys.stderr)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    (out_dir / f"{name}.md").write_text(md)
    print(md)
    print(f"wrote {out_dir / (name + '.json')} and .md")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        _worker_main(sys.argv[2:])
    else:
        main()
