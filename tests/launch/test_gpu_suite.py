"""bench/gpu_suite.sh (`make gpu-bench`): step selection and carrying on past a failing step.

A GPU session is scarce, so one failing step must not cost the others. Run here with a stub
interpreter that names a fake device, fails the GPU tests and records every other call."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "bench" / "gpu_suite.sh"


def _stub_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    python = f"""#!/usr/bin/env bash
echo "python $*" >> {calls}
case "$1" in
  -c) echo fake-gpu ;;
  -m) [ "$2" = pytest ] && {{ echo "1 failed"; exit 1; }} ;;   # pytest -m gpu: fails
esac
exit 0
"""
    profile = f"""#!/usr/bin/env bash
echo "profile $*" >> {calls}
"""
    for name, text in (("python", python), ("attnres-train-profile", profile)):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def _run(tmp_path, *steps):
    bin_dir = _stub_bin(tmp_path)
    env = dict(os.environ, PYTHON=str(bin_dir / "python"), GPU_SUITE_RESULTS=str(tmp_path))
    proc = subprocess.run(["bash", str(SUITE), *steps], env=env, capture_output=True, text=True,
                          timeout=60)
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    return proc, calls


def test_a_failing_step_does_not_stop_the_others(tmp_path):
    proc, calls = _run(tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "tests: FAILED" in proc.stderr
    for step in ("op", "tiles", "profile"):
        assert f"{step}: ok" in proc.stderr, proc.stderr
    scripts = [c.split()[2] for c in calls if c.startswith("python -m bench.")]
    assert scripts == ["bench.attnres_op", "bench.attnres_op", "bench.triton_tiles"]
    assert any(c.startswith("profile ") and "model=small" in c for c in calls)
    assert list(tmp_path.glob("gpu_tests_fake-gpu_*.log"))  # the test log went to the results dir


def test_steps_can_be_picked_and_bad_names_are_refused(tmp_path):
    proc, calls = _run(tmp_path, "tiles")
    assert proc.returncode == 0, proc.stderr
    scripts = [c for c in calls if "-m bench." in c]
    assert len(scripts) == 1 and "-m bench.triton_tiles --preset kimi48b" in scripts[0]
    assert not any(c.startswith("profile ") for c in calls)
    bad = subprocess.run(["bash", str(SUITE), "tiels"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown step 'tiels'" in bad.stderr
