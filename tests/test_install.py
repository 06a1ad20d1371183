"""A non-editable `pip install .` works: the wheel carries the configs and the bundled corpus, and the
installed package runs a dry run from a directory that is not the checkout.

Offline and without a second environment: the wheel is built from a copy of the sources (so the
checkout gets no build/ or egg-info), installed with --no-deps into a target directory, and run by
this interpreter with only that directory on PYTHONPATH, its dependencies coming from this venv.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: what setuptools needs to build the wheel (pyproject's readme included)
SOURCES = ("pyproject.toml", "README.md", "attnres_train", "parallel")

pytestmark = pytest.mark.slow


def _pip(*args: str, cwd: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "pip", *args, "--no-deps", "--no-index", "--quiet",
                          "--disable-pip-version-check"],
                         cwd=cwd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The site directory the wheel was installed into."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    _pip("wheel", "--no-build-isolation", "--wheel-dir", str(tmp / "dist"), str(src), cwd=tmp)
    wheel, = (tmp / "dist").glob("attnres_train-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("attnres_train/configs/config.yaml", "attnres_train/configs/model/kimi_linear_48b_a3b.yaml",
                   "attnres_train/configs/train/default.yaml", "attnres_train/data/corpora/tinyshakespeare.txt",
                   "parallel/pipeline.py"):
        assert needed in names, needed
    _pip("install", "--target", str(tmp / "site"), str(wheel), cwd=tmp)
    return tmp / "site"


def test_wheel_runs_a_dry_run_outside_the_checkout(installed, tmp_path):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(installed)
    where = subprocess.run(
        [sys.executable, "-c", "import attnres_train, parallel, attnres_train.train as t; "
                               "print(attnres_train.__file__); print(parallel.__file__); print(t.CONFIG_DIR)"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    # the installed copy, not the checkout (which this venv's editable install would otherwise give)
    for path in where.stdout.split():
        assert Path(path).is_relative_to(installed), path

    run_dir = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "attnres_train.train", "model=kimi_linear_48b_a3b", "train.dry_run=true",
         f"hydra.run.dir={run_dir}"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    plan = json.loads((run_dir / "plan.json").read_text())  # the model yaml came from the installed configs
    assert (plan["model"], plan["params_total"], plan["params_active"]) == \
        ("kimi_linear_48b_a3b", 49_122_935_168, 3_484_713_344)
    assert list(cwd.iterdir()) == []  # nothing written to the cwd: hydra's run dir was given
