"""The trainer end to end on the bundled corpus (subprocess, CPU, gloo).

References: an unbroken run (resume), a single-process run with the same global batch (DP=2).
"""

from __future__ import annotations

import math
import shutil

import pytest
import yaml

from tests.e2e.conftest import losses, metrics, run_cli, summary

pytestmark = pytest.mark.slow


def test_loss_decreases_and_outputs_exist(cli, tmp_path):
    run = tmp_path / "run"
    proc = cli(run, "logging.diag_interval=3", "logging.tensorboard=true", "logging.wandb.enabled=true")
    m = metrics(run)
    assert [r["step"] for r in m if "loss" in r] == [1, 2, 3, 4, 5, 6]
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"):
        assert all(key in r for r in m if "loss" in r), key
    vals = [r["val_loss"] for r in m if "val_loss" in r]
    assert len(vals) == 2 and vals[1] < vals[0] < math.log(4096) + 0.5
    assert (run / "config.yaml").is_file() and (run / "summary.json").is_file()
    assert sorted(p.name for p in (run / "diagnostics").glob("*.png")) == ["step_0000003.png", "step_0000006.png"]
    assert any((run / "tensorboard").iterdir())
    assert list((run / "wandb").glob("offline-run-*"))  # wandb runs offline by default
    assert "step 6/6" in proc.stdout and "tok/s" in proc.stdout and "eta" in proc.stdout
    # the backend that ran is saved with the run: resolved in config.yaml, with reasons in summary.json
    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]
    assert (saved["linear"], saved["attnres"]["kernel"], saved["kda"]["impl"]) == ("local", "torch", "chunk")
    assert summary(run)["backend"] == {"linear": "local", "linear_reason": "no CUDA", "kda": "chunk",
                                       "kda_reason": "auto: no CUDA", "attnres_kernel": "torch",
                                       "attnres_reason": "auto: no CUDA", "device": "cpu", "te_version": None}
    assert "backend: linear=local (no CUDA), kda=chunk (auto: no CUDA), attnres=torch (auto: no CUDA)" in proc.stdout


def test_refused_value_is_one_line_with_exit_code_2(cli, tmp_path):
    proc = cli(tmp_path / "run", "model.residual=bogus", check=False)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["attnres-train: error: model.residual='bogus': use one of standard, full, block"]
    assert not (tmp_path / "run").exists()


def test_resume_is_bit_exact(cli, tmp_path):
    """Stopped after the step-3 checkpoint and resumed == unbroken, bit for bit (CPU, fp32)."""
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    cli(unbroken, "train.save_interval=3")
    cli(broken, "train.save_interval=3")
    # simulate a run killed between the step-3 and step-6 checkpoints
    shutil.rmtree(broken / "checkpoints" / "step_0000006")
    (broken / "summary.json").unlink()
    proc = cli(broken, "train.save_interval=3")
    assert "resumed from step 3" in proc.stdout
    assert losses(broken) == losses(unbroken)
    assert [r["step"] for r in metrics(broken) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert summary(broken)["weights_sha256"] == summary(unbroken)["weights_sha256"]
    assert summary(broken)["final_val_loss"] == summary(unbroken)["final_val_loss"]


def test_corrupt_and_partial_checkpoints_fall_back(cli, tmp_path):
    run = tmp_path / "run"
    cli(run, "train.save_interval=2", "train.keep_last=3")
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000002", "step_0000004", "step_0000006"]
    # a save that was killed midway, and a corrupt newest checkpoint
    (ckpts / ".tmp-step_0000008").mkdir()
    for f in (ckpts / "step_0000006").glob("*.distcp"):
        f.write_bytes(b"garbage")
    proc = cli(run, "train.save_interval=2", "train.keep_last=3", "train.steps=8")
    out = proc.stdout + proc.stderr
    assert "ignoring incomplete checkpoint" in out and ".tmp-step_0000008" in out
    assert "step_0000006 cannot be loaded" in out and "falling back" in out
    assert "resumed from step 4" in out
    assert (ckpts / "step_0000008").is_dir()


def test_resume_with_different_model_shape_is_an_error(cli, tmp_path):
    run = tmp_path / "run"
    cli(run, "train.steps=2", "train.eval_interval=0")
    proc = cli(run, "train.steps=4", "model.hidden_size=64", check=False)
    assert proc.returncode != 0
    assert "model.hidden_size=64" in proc.stderr and "different model shape" in proc.stderr
    assert (run / "checkpoints" / "step_0000002").is_dir()  # nothing already written is lost


def test_data_parallel_2_matches_1(cli, tmp_path):
    """torchrun with 2 gloo ranks (distributed optimizer) == 1 process, same global batch.

    Tolerance: 2e-5 relative per step (fp32; DP changes the order of the gradient reduction)."""
    one, two = tmp_path / "dp1", tmp_path / "dp2"
    cli(one)
    cli(two, nproc=2)
    a, b = losses(one), losses(two)
    assert a.keys() == b.keys()
    for step in a:
        assert abs(a[step] - b[step]) <= 2e-5 * abs(a[step]), (step, a[step], b[step])


# Runs on other layouts start from the unsplit model's initial weights and are compared with one
# single-process run of the same settings (checkpoints every 2 steps included).
LAYOUT_COMMON = ["train.layout_independent_init=true", "train.steps=4", "train.save_interval=2",
                 "train.eval_interval=0"]


@pytest.fixture(scope="module")
def one_process_losses(tmp_path_factory, data_cache):
    run = tmp_path_factory.mktemp("layouts") / "one"
    run_cli(data_cache, run, *LAYOUT_COMMON)
    return losses(run)


@pytest.mark.parametrize("layout", [["parallel.tp=2"], ["parallel.ep=2"]], ids=["tp2", "ep2"])
def test_tensor_and_expert_parallel_training_match_one_process(cli, tmp_path, layout, one_process_losses):
    """The trainer under TP=2 (sequence parallel) or EP=2 (x DP=2) follows the one-process loss
    curve from the same initial weights, checkpoints included (saved every 2 steps).

    Tolerance: 1e-4 relative per step (fp32 reassociation through a few Adam steps)."""
    two = tmp_path / "two"
    cli(two, *LAYOUT_COMMON, *layout, nproc=2)
    a, b = one_process_losses, losses(two)
    assert a.keys() == b.keys() and len(a) == 4
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-4 * abs(a[step]), (step, a[step], b[step])
    assert (two / "checkpoints").is_dir()


# Pipeline layouts are refused from the config alone, before any process group or build: checked on
# the composed config in process (validate_config, what the CLI runs first; the CLI's one-line
# output is checked on the cases below).
CONFIG_ONLY = [
    (["parallel.pp=3"], r"parallel.pp=3: 4 layers do not split evenly into pp\*vpp = 3 chunks"),
    (["parallel.pp=2", "parallel.vpp=4"], r"parallel.vpp=4: 4 layers cannot fill pp\*vpp = 8 pipeline chunks"),
    (["parallel.pp=2", "parallel.layers_per_stage=[1,2]"],
     r"parallel.layers_per_stage=\[1, 2\]: the counts sum to 3 but the model has model.num_layers=4"),
    (["parallel.pp=2", "parallel.layers_per_stage=[1,1,2]"], r"parallel.layers_per_stage.*one layer count per pipeline chunk"),
]


@pytest.mark.parametrize("overrides,match", CONFIG_ONLY)
def test_bad_config_is_refused_before_anything_is_built(overrides, match):
    from attnres_train.config import ConfigError, validate_config
    from attnres_train.config.compose import compose_config
    from tests.e2e.conftest import FAST

    with pytest.raises(ConfigError, match=match):
        validate_config(compose_config([*FAST, *overrides]))


@pytest.mark.parametrize("overrides,match", [
    (["train.global_batch_size=10"], "train.global_batch_size=10: must be divisible by train.micro_batch_size"),
    (["model.seq_length=100000"], "model.seq_length"),
    (["parallel.recompute=selective", "parallel.recompute_modules=[moe_act]"], r"parallel.recompute_modules"),
    (["parallel.tp=2"], "world size 1 is not divisible by tp\\*pp=2"),
    (["data.paths=[/nonexistent/corpus.txt]"], "data.paths"),
    (["data.tokenizer=/nonexistent/tokenizer.json"], "data.tokenizer"),
    (["model.vocab_size=256"], "model.vocab_size=256.*tokenizer has 4096"),
    (["train.lr=-1"], r"(?m)^attnres-train: error: train.lr=-1.0: must be > 0$"),
    (["train.micro_batch_size=0"], r"(?m)^attnres-train: error: train.micro_batch_size=0: must be >= 1$"),
])
def test_bad_input_fails_early_with_clear_error(cli, tmp_path, overrides, match):
    import re

    proc = cli(tmp_path / "run", *overrides, check=False)
    assert proc.returncode != 0
    assert re.search(match, proc.stderr), proc.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_pipeline_pp2_vpp2_matches_one_stage(cli, tmp_path, one_process_losses):
    """A few real training steps (optimizer, data, AttnRes payloads) under PP=2 x VPP=2 (2 gloo
    ranks, interleaved 1F1B) follow the single-stage loss curve. Tolerance 1e-5 relative per step:
    the forward is bitwise equal, gradients differ by fp32 summation order (see test_pipeline)."""
    pp = tmp_path / "pp"
    cli(pp, *LAYOUT_COMMON, "parallel.pp=2", "parallel.vpp=2", nproc=2)
    a, b = one_process_losses, losses(pp)
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    assert a[1] == b[1]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])
