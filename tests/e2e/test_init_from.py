"""train.init_from: an imported Kimi Linear checkpoint starts training on any layout.

A random transformers Kimi Linear (tests/convert) is imported with attnres-train-convert, and
attnres-train runs its first step from it with the import's own model config (`--config-dir`)
on one process, TP=2, PP=2 and EP=2: with a learning rate of 1e-12, the step-1 training loss and
the validation loss (the imported model's logits on the same tokens) agree across layouts.
Starting from a training checkpoint's weights and the refusals are checked too.
"""

from __future__ import annotations

import functools

import pytest

from tests.e2e.conftest import ROOT, losses, metrics, run_cli

FIRST_STEP = ["train.steps=1", "train.lr=1e-12", "train.min_lr=1e-13", "train.warmup_steps=0", "train.eval_interval=1",
              "train.eval_batches=2", "model.seq_length=32", "data.vocab_size=384",
              "model.moe.bias_update_rate=0"]  # the router's expert bias moves whatever the learning rate
LAYOUTS = {"tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"], "ep2": ["parallel.ep=2"]}
REL = 2e-6  # float32: tensor-parallel reductions and expert dispatch reassociate sums


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A random HF Kimi Linear (vocabulary 384, the BPE the runs train) imported with the CLI."""
    import subprocess
    import sys

    from tests.convert.test_hf import CASES, hf_model

    root = tmp_path_factory.mktemp("init_from")
    hf_model(CASES["mla_middle"]).save_pretrained(root / "kimi_tiny")
    proc = subprocess.run([sys.executable, "-m", "attnres_train.convert.cli", "import", str(root / "kimi_tiny"),
                           str(root / "ckpt")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1", "PYTHONPATH": str(ROOT),
                               "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"--config-dir {root / 'ckpt'} model=kimi_tiny train.init_from={root / 'ckpt'}" in proc.stdout
    return root / "ckpt"


def first_step(cli, run_dir, init_from, *extra, model_dir=None, nproc=1):
    """Step 1 of a run from `init_from` with the import's model config (under `model_dir`, the
    import itself by default): (its training loss, its validation loss, the process)."""
    proc = cli(run_dir, f"hydra.searchpath=[file://{model_dir or init_from}]", "model=kimi_tiny",
               f"train.init_from={init_from}", *FIRST_STEP, *extra, nproc=nproc)
    val = [r["val_loss"] for r in metrics(run_dir) if "val_loss" in r]
    return losses(run_dir)[1], val[0], proc


@pytest.fixture(scope="module")
def one_process(imported, tmp_path_factory, data_cache):
    """Step 1 from the import on one process: (run dir, training loss, validation loss, stdout)."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    loss, val, proc = first_step(functools.partial(run_cli, data_cache), run_dir, imported)
    return run_dir, loss, val, proc.stdout


def test_an_import_starts_the_same_on_every_layout(cli, imported, one_process, tmp_path):
    _, loss, val, stdout = one_process
    assert f"initialised the weights from {imported} (weights" in stdout
    for name, overrides in LAYOUTS.items():
        other, other_val, _ = first_step(cli, tmp_path / name, imported, *overrides, nproc=2)
        assert abs(other - loss) <= REL * loss, (name, other, loss)
        assert abs(other_val - val) <= REL * val, (name, other_val, val)


def test_init_from_a_training_checkpoint_and_the_refusals(cli, imported, one_process, tmp_path):
    run_dir, loss, _, _ = one_process
    # a run dir names its newest checkpoint; its weights (unchanged at lr 1e-12) give the same loss
    again, _, proc = first_step(cli, tmp_path / "b", run_dir, model_dir=imported)
    assert "(training checkpoint, step 1)" in proc.stdout
    assert abs(again - loss) <= REL * loss
    # a run that has a checkpoint of its own resumes from it
    proc = cli(tmp_path / "b", f"hydra.searchpath=[file://{imported}]", "model=kimi_tiny", f"train.init_from={imported}",
               *FIRST_STEP, "train.steps=2")
    assert f"train.init_from={imported} not used: resuming this run from its step 1" in proc.stdout
    # another model shape, or no checkpoint there: exit 2 naming the key
    proc = cli(tmp_path / "c", f"train.init_from={imported}", *FIRST_STEP, check=False)
    assert proc.returncode == 2 and "train.init_from=" in proc.stderr and "it holds another model" in proc.stderr
    proc = cli(tmp_path / "d", f"train.init_from={tmp_path / 'nowhere'}", *FIRST_STEP, check=False)
    assert proc.returncode == 2 and "is not a checkpoint of this project" in proc.stderr
