import os

import torch

from attnres_train import cpu_compat


def test_rng_tracker_forks_cpu_streams(mcore_world):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    if not cpu_compat.needed():
        return
    tracker = get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(3)
    # The default stream is untouched by the fork, and the named stream advances.
    assert torch.equal(before, torch.get_rng_state())
    with tracker.fork():
        b = torch.rand(3)
    assert not torch.equal(a, b)


# A fresh interpreter per case: the OpenMP setting is process-wide and cannot be undone.
_GATHER_PROBE = r"""
import json, os, sys, threading
import torch, torch.distributed as dist
from attnres_train import cpu_compat

a = torch.randn(300, 300, generator=torch.Generator().manual_seed(0))
before_mm = a @ a
confined = cpu_compat.confine_openmp_to_this_thread() if sys.argv[1] == "confine" else False
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
dist.init_process_group("gloo", rank=0, world_size=1)
def tasks():
    names = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            names[tid] = open(f"/proc/self/task/{tid}/comm").read().strip()
        except OSError:
            pass
    return names
n0 = tasks()
# what a distributed-checkpoint save does: gloo's worker thread copies the gathered bytes
out = [None]
dist.all_gather_object(out, {"metadata": b"x" * 1_000_000})
seen = {}
def helper():
    torch.tanh(torch.randn(1 << 21))
    seen["threads"] = torch.get_num_threads()
t = threading.Thread(target=helper); t.start(); t.join()
new = {tid: name for tid, name in tasks().items() if tid not in n0}
print(json.dumps(dict(confined=confined, new_names=sorted(new.values()),
                      main_threads=torch.get_num_threads(),
                      helper_threads=seen["threads"], same_matmul=bool(torch.equal(before_mm, a @ a)))))
dist.destroy_process_group()
"""


def _gather_probe(mode):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from parallel.groups import free_port

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(root), TORCHDYNAMO_DISABLE="1")
    proc = subprocess.run([sys.executable, "-c", _GATHER_PROBE, mode, str(free_port())], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_openmp_teams_stay_in_the_training_thread():
    """After an all-gather (what a checkpoint save runs) gloo's worker thread owns no OpenMP team
    of its own, nor does any other helper thread, while the training thread keeps its 2 threads
    and bit-identical results. Without the setting the same all-gather leaves a new OpenMP worker
    behind (the cause of the 40% slowdown after the first checkpoint on a 2-core machine)."""
    if not cpu_compat.needed():
        return
    control = _gather_probe("control")
    assert control["main_threads"] == 2 and control["helper_threads"] == 2
    # an OpenMP worker is named after the thread that starts it: here gloo's worker thread
    assert "pt_gloo_runloop" in control["new_names"]  # the probe does see that team

    fixed = _gather_probe("confine")
    assert fixed["confined"] is True
    assert "pt_gloo_runloop" not in fixed["new_names"]
    assert fixed["main_threads"] == 2 and fixed["helper_threads"] == 1
    assert fixed["same_matmul"] is True
