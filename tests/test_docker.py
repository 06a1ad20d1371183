"""Static checks of docker/Dockerfile, .dockerignore and docker/README.md (no docker daemon).

CI has neither a docker daemon nor access to nvcr.io, so the image is never built here. Instead
a small pure-python Dockerfile reader (parser directives, comments, line continuations, heredocs,
ARG/ENV expansion) feeds a checker with the rules this project holds its image to:

- the first instruction is ARG or FROM; every instruction keyword is a Dockerfile instruction;
- every FROM names a pinned image: a tag other than ``latest`` (or a digest), its variables
  resolved from ARG defaults;
- COPY/ADD sources exist in the build context and are not excluded by .dockerignore; ADD only
  for remote sources;
- every ``pip install`` uses ``--no-cache-dir`` and pins each package with ``==`` (local paths
  such as ``-e .`` excepted; no ``-r`` files, whose pins would go unchecked);
- every ``apt-get install`` has ``-y`` and ``--no-install-recommends``, with ``apt-get update``
  before it and ``rm -rf /var/lib/apt/lists/*`` after it in the same RUN;
- CMD/ENTRYPOINT in JSON form, no MAINTAINER.

Then the project's own expectations: the NGC PyTorch base pinned through an ARG, no reinstall of
torch/Transformer Engine/Triton, the same pins as pyproject.toml (megatron-core above all), the
.dockerignore exclusions, and the README's commands. Bad Dockerfiles fed to the checker show
that each rule reports. hadolint runs too when it is on PATH.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKER_README = ROOT / "docker" / "README.md"
DOCKERIGNORE = ROOT / ".dockerignore"

# ---------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------

INSTRUCTIONS = frozenset({
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
    "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
})

_DIRECTIVE = re.compile(r"^#\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(.*?)\s*$")
_HEREDOC = re.compile(r"<<(-?)([\"']?)([A-Za-z_][A-Za-z0-9_]*)\2")


class DockerfileSyntaxError(ValueError):
    pass


@dataclass(frozen=True)
class Instruction:
    line: int                  # 1-based line of the keyword
    keyword: str               # upper-cased keyword as written (may be invalid)
    args: str                  # the arguments, continuation lines joined as docker joins them
    heredocs: Tuple[str, ...] = ()


def parse_dockerfile(text: str) -> List[Instruction]:
    """Instructions of a Dockerfile: parser directives and comments dropped, continuation lines
    joined (the escape character and newline removed, like docker), comment and blank lines
    inside a continuation skipped, heredoc bodies (``<<EOF`` ... ``EOF``) collected."""
    lines = text.splitlines()
    escape = "\\"
    i = 0
    while i < len(lines):  # parser directives: only at the very top
        m = _DIRECTIVE.match(lines[i])
        if not m:
            break
        if m.group(1).lower() == "escape":
            if m.group(2) not in ("\\", "`"):
                raise DockerfileSyntaxError(f"line {i + 1}: invalid escape directive {m.group(2)!r}")
            escape = m.group(2)
        i += 1

    out: List[Instruction] = []
    while i < len(lines):
        first, cur = i, lines[i]
        i += 1
        if not cur.strip() or cur.lstrip().startswith("#"):
            continue
        parts: List[str] = []
        while True:
            body = cur.rstrip()
            if not body.endswith(escape):
                parts.append(body)
                break
            parts.append(body[: -len(escape)])
            while i < len(lines) and (not lines[i].strip() or lines[i].lstrip().startswith("#")):
                i += 1
            if i >= len(lines):
                break
            cur = lines[i]
            i += 1
        logical = "".join(parts).strip()
        m = re.match(r"(\S+)\s*(.*)", logical, re.S)
        keyword, args = m.group(1).upper(), m.group(2)
        bodies: List[str] = []
        if keyword in ("RUN", "COPY", "ADD"):
            for hd in _HEREDOC.finditer(args):
                strip_tabs, word = hd.group(1) == "-", hd.group(3)
                body_lines = []
                while True:
                    if i >= len(lines):
                        raise DockerfileSyntaxError(f"line {first + 1}: heredoc {word} not terminated")
                    ln = lines[i]
                    i += 1
                    if (ln.lstrip("\t") if strip_tabs else ln) == word:
                        break
                    body_lines.append(ln)
                bodies.append("\n".join(body_lines))
        out.append(Instruction(first + 1, keyword, args, tuple(bodies)))
    return out


_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?::([-+])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def expand(value: str, env: Dict[str, Optional[str]]) -> Tuple[str, List[str]]:
    """``$NAME`` / ``${NAME}`` / ``${NAME:-default}`` / ``${NAME:+alt}`` against ``env``
    (None = declared without a value); returns the text and the names left unresolved."""
    missing: List[str] = []

    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(4)
        val = env.get(name)
        if m.group(2) == "-":
            return val if val else m.group(3)
        if m.group(2) == "+":
            return m.group(3) if val else ""
        if val is None:
            missing.append(name)
            return m.group(0)
        return val

    return _VAR.sub(sub, value), missing


def _assignments(args: str, keyword: str) -> List[Tuple[str, Optional[str]]]:
    """NAME[=value] pairs of ARG, NAME=value pairs (or the legacy ``NAME value``) of ENV."""
    tokens = shlex.split(args, comments=False, posix=True)
    if keyword == "ENV" and tokens and "=" not in tokens[0]:
        return [(tokens[0], args.split(None, 1)[1].strip() if len(tokens) > 1 else "")]
    pairs = []
    for tok in tokens:
        name, eq, value = tok.partition("=")
        pairs.append((name, value if eq else None))
    return pairs


# ---------------------------------------------------------------------------------------------
# .dockerignore
# ---------------------------------------------------------------------------------------------

def _pattern_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go filepath.Match plus ``**``) as a regex over '/'-paths."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if i < n and pattern[i] == "/":
                out.append("(?:.*/)?")
                i += 1
            else:
                out.append(".*")
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j < 0:
                out.append(re.escape(c))
            else:
                cls = pattern[i + 1:j]
                out.append("[" + ("^" + cls[1:] if cls.startswith("^") else cls) + "]")
                i = j
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))


def read_dockerignore(text: str) -> List[Tuple[bool, re.Pattern]]:
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = os.path.normpath(line[1:].strip() if negate else line).lstrip("/")
        rules.append((negate, _pattern_regex(pat)))
    return rules


def is_ignored(path: str, rules: Sequence[Tuple[bool, re.Pattern]]) -> bool:
    """Whether ``path`` (relative to the context) is left out of the build context: the last
    matching rule wins, and a rule matching a parent directory matches everything below it."""
    path = os.path.normpath(path).lstrip("/")
    parts = path.split("/")
    prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    ignored = False
    for negate, rx in rules:
        if any(rx.fullmatch(p) for p in prefixes):
            ignored = not negate
    return ignored


# ---------------------------------------------------------------------------------------------
# Checker
# ---------------------------------------------------------------------------------------------

@dataclass
class Report:
    instructions: List[Instruction]
    errors: List[str] = field(default_factory=list)
    images: List[str] = field(default_factory=list)          # FROM images, variables resolved
    pip_pins: Dict[str, str] = field(default_factory=dict)   # normalised name -> version
    pip_local: List[str] = field(default_factory=list)       # local paths pip installs (-e .)

    def err(self, ins: Instruction, msg: str) -> None:
        self.errors.append(f"line {ins.line}: {ins.keyword}: {msg}")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


_PIN = re.compile(r"^([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)(\[[A-Za-z0-9,._ -]*\])?"
                  r"==([A-Za-z0-9][A-Za-z0-9.+!_-]*)(\s*;.*)?$")
_SHELL_OPS = {"&&", "||", ";", "|", "&", "(", ")", ";;", "|&"}
_SHELL_PREFIXES = {"if", "then", "else", "elif", "do", "while", "until", "!", "{", "}",
                   "sudo", "exec", "command", "time", "env", "nohup"}
_PIP_VALUE_OPTS = {
    "-r", "--requirement", "-c", "--constraint", "-e", "--editable", "-i", "--index-url",
    "--extra-index-url", "-f", "--find-links", "-t", "--target", "--prefix", "--root", "--src",
    "--platform", "--python-version", "--implementation", "--abi", "--upgrade-strategy",
    "--progress-bar", "--cache-dir", "--log", "--proxy", "--retries", "--timeout",
    "--exists-action", "--trusted-host", "--cert", "--client-cert", "--global-option",
    "--config-settings", "-C", "--only-binary", "--no-binary", "--report", "--root-user-action",
    "--python", "--keyring-provider", "--use-feature", "--use-deprecated", "--group",
}


def _is_local(spec: str) -> bool:
    return spec in (".", "..") or spec.startswith(("./", "../", "/", "file:"))


def shell_commands(script: str) -> List[List[str]]:
    """Simple commands of a shell script: split on && || ; | & ( ), leading variable
    assignments and wrappers (if/then/sudo/env ...) removed."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError as e:  # unbalanced quotes
        raise DockerfileSyntaxError(str(e)) from None
    cmds, cur = [], []
    for tok in tokens + [";"]:
        if tok in _SHELL_OPS:
            while cur and (cur[0] in _SHELL_PREFIXES or re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", cur[0])):
                cur.pop(0)
            if cur:
                cmds.append(cur)
            cur = []
        else:
            cur.append(tok)
    return cmds


def _pip_args(cmd: List[str]) -> Optional[List[str]]:
    """The arguments after ``install`` if ``cmd`` is a pip install, else None."""
    prog = os.path.basename(cmd[0])
    if re.fullmatch(r"pip(\d+(\.\d+)?)?", prog) and len(cmd) > 1 and cmd[1] == "install":
        return cmd[2:]
    if re.fullmatch(r"python(\d+(\.\d+)?)?", prog) and cmd[1:4] == ["-m", "pip", "install"]:
        return cmd[4:]
    return None


def _check_pip(report: Report, ins: Instruction, args: List[str], env) -> None:
    if "--no-cache-dir" not in args:
        report.err(ins, "pip install without --no-cache-dir")
    i = 0
    while i < len(args):
        tok = args[i]
        i += 1
        if tok.startswith("-"):
            opt = tok.split("=", 1)[0]
            value = tok.split("=", 1)[1] if "=" in tok else None
            if opt in _PIP_VALUE_OPTS and value is None:
                value = args[i] if i < len(args) else ""
                i += 1
            if opt in ("-r", "--requirement"):
                report.err(ins, f"pip install -r {value}: list the packages inline so that their "
                                "pins can be checked")
            elif opt in ("-e", "--editable"):
                if _is_local(value):
                    report.pip_local.append(f"-e {value}")
                else:
                    report.err(ins, f"pip install -e {value}: only local paths may be unpinned")
            continue
        spec, missing = expand(tok, env)
        if missing:
            report.err(ins, f"pip package {tok!r}: unresolved variable(s) {', '.join(missing)}")
            continue
        if _is_local(spec):
            report.pip_local.append(spec)
            continue
        m = _PIN.match(spec)
        if not m or "*" in m.group(3):
            report.err(ins, f"pip package {spec!r} is not pinned with ==")
            continue
        name, version = normalise(m.group(1)), m.group(3)
        if report.pip_pins.get(name, version) != version:
            report.err(ins, f"pip package {name} pinned twice: {report.pip_pins[name]} and {version}")
        report.pip_pins[name] = version


def _check_apt(report: Report, ins: Instruction, cmds: List[List[str]]) -> None:
    def sub(cmd):  # the apt subcommand: first non-option word
        return next((t for t in cmd[1:] if not t.startswith("-")), None)

    updated = False
    for k, cmd in enumerate(cmds):
        prog = os.path.basename(cmd[0])
        if prog == "apt" and sub(cmd) in ("install", "update", "upgrade"):
            report.err(ins, "use apt-get, not apt, in scripts")
        if prog != "apt-get":
            continue
        if sub(cmd) == "update":
            updated = True
        if sub(cmd) != "install":
            continue
        if "--no-install-recommends" not in cmd:
            report.err(ins, "apt-get install without --no-install-recommends")
        if not any(t in ("--yes", "--assume-yes") or re.fullmatch(r"-[a-z]*y[a-z]*", t) for t in cmd):
            report.err(ins, "apt-get install without -y")
        if not updated:
            report.err(ins, "apt-get install without apt-get update before it in the same RUN")
        cleaned = any(os.path.basename(c[0]) == "rm" and
                      any(t.startswith("/var/lib/apt/lists") for t in c[1:]) for c in cmds[k + 1:])
        if not cleaned:
            report.err(ins, "apt-get install without rm -rf /var/lib/apt/lists/* after it in the "
                            "same RUN")


def _copy_sources(args: str) -> Tuple[Dict[str, str], List[str]]:
    """Flags and sources (destination dropped) of COPY/ADD, shell or JSON form."""
    flags: Dict[str, str] = {}
    words = args.split()
    while words and words[0].startswith("--"):
        name, _, value = words.pop(0)[2:].partition("=")
        flags[name] = value
    rest = " ".join(words)
    if rest.startswith("["):
        try:
            words = json.loads(rest)
        except json.JSONDecodeError:
            return flags, []
    return flags, words[:-1]


def check_dockerfile(text: str, context: Optional[Path] = None,
                     dockerignore: Optional[str] = None) -> Report:
    """Check a Dockerfile's text; ``context`` (the build context directory) enables the COPY/ADD
    source checks, ``dockerignore`` (its .dockerignore text) the exclusion check."""
    try:
        instructions = parse_dockerfile(text)
    except DockerfileSyntaxError as e:
        return Report([], [f"syntax: {e}"])
    report = Report(instructions)
    if not instructions:
        report.errors.append("no instructions")
        return report
    if instructions[0].keyword not in ("ARG", "FROM"):
        report.err(instructions[0], "the first instruction must be ARG or FROM")
    ignore_rules = read_dockerignore(dockerignore or "")

    meta: Dict[str, Optional[str]] = {}   # ARGs before the first FROM: in scope for FROM only
    env: Optional[Dict[str, Optional[str]]] = None
    stages: List[str] = []
    for ins in instructions:
        kw = ins.keyword
        if kw not in INSTRUCTIONS:
            report.err(ins, "unknown instruction")
            continue
        if env is None and kw not in ("ARG", "FROM"):
            report.err(ins, "only ARG may come before the first FROM")
            continue
        if kw == "ARG":
            for name, value in _assignments(ins.args, "ARG"):
                if env is None:
                    meta[name] = value
                else:
                    env[name] = expand(value, env)[0] if value is not None else meta.get(name)
        elif kw == "ENV":
            for name, value in _assignments(ins.args, "ENV"):
                env[name] = expand(value or "", env)[0]
        elif kw == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--")]
            if not words:
                report.err(ins, "no image")
                continue
            image, missing = expand(words[0], meta)
            if len(words) >= 3 and words[1].lower() == "as":
                stages.append(words[2].lower())
            env = {}
            if missing:
                report.err(ins, f"image {words[0]!r}: ARG(s) without a default: {', '.join(missing)}")
                continue
            report.images.append(image)
            if image.lower() in stages[:-1] or image == "scratch" or "@sha256:" in image:
                continue
            name_part = image.rsplit("/", 1)[-1]
            tag = name_part.split(":", 1)[1] if ":" in name_part else ""
            if not tag:
                report.err(ins, f"image {image!r} has no tag: pin one")
            elif tag == "latest":
                report.err(ins, f"image {image!r} uses the floating tag latest: pin a release")
        elif kw in ("COPY", "ADD"):
            flags, sources = _copy_sources(ins.args)
            if not sources:
                report.err(ins, "needs a source and a destination")
            if "from" in flags:
                continue
            for src in sources:
                if src.startswith("<<"):
                    continue
                remote = re.match(r"^(https?|git)://|^git@", src) is not None
                if kw == "ADD" and not remote:
                    report.err(ins, f"ADD of the local file {src!r}: use COPY")
                if remote or context is None:
                    continue
                src, _ = expand(src, env)
                rel = os.path.normpath(src).lstrip("/")
                matches = ([str(context)] if rel == "." else
                           glob.glob(str(context / rel)))
                if not matches:
                    report.err(ins, f"source {src!r} does not exist in the build context")
                elif rel != "." and all(
                        is_ignored(os.path.relpath(p, context), ignore_rules) for p in matches):
                    report.err(ins, f"source {src!r} is excluded by .dockerignore")
        elif kw in ("CMD", "ENTRYPOINT"):
            try:
                ok = isinstance(json.loads(ins.args), list)
            except json.JSONDecodeError:
                ok = False
            if not ok:
                report.err(ins, "use the JSON (exec) form")
        elif kw == "MAINTAINER":
            report.err(ins, "MAINTAINER is deprecated: use LABEL")
        elif kw == "RUN":
            script = ins.args
            if script.lstrip().startswith("["):
                try:
                    script = " ".join(shlex.quote(a) for a in json.loads(script))
                except json.JSONDecodeError:
                    pass
            script = "\n".join([re.sub(r"^(--[a-z]+(=\S*)?\s+)+", "", script)] + list(ins.heredocs))
            try:
                cmds = shell_commands(script.replace("\n", " ; "))
            except DockerfileSyntaxError as e:
                report.err(ins, f"cannot split the shell script: {e}")
                continue
            for cmd in cmds:
                pip = _pip_args(cmd)
                if pip is not None:
                    _check_pip(report, ins, pip, env)
            _check_apt(report, ins, cmds)
    if env is None:
        report.errors.append("no FROM instruction")
    return report


# ---------------------------------------------------------------------------------------------
# Helpers over the real files
# ---------------------------------------------------------------------------------------------

def pyproject_pins() -> Dict[str, str]:
    """name -> version of every ``name==version`` requirement string in pyproject.toml."""
    text = (ROOT / "pyproject.toml").read_text()
    pins = {}
    for m in re.finditer(r"\"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\"\s;]+)\"", text):
        pins[normalise(m.group(1))] = m.group(2)
    return pins


def real_report() -> Report:
    return check_dockerfile(DOCKERFILE.read_text(), ROOT, DOCKERIGNORE.read_text())


def fenced_blocks(markdown: str) -> List[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", markdown, re.S | re.M)


def commands_in(markdown: str, start: str) -> List[str]:
    """Shell commands in the fenced blocks that begin with ``start`` (continuations joined)."""
    out = []
    for block in fenced_blocks(markdown):
        joined = re.sub(r"\\\n\s*", " ", block)
        out += [ln.strip() for ln in joined.splitlines() if ln.strip().startswith(start)]
    return out


# ---------------------------------------------------------------------------------------------
# The project's Dockerfile
# ---------------------------------------------------------------------------------------------

def test_dockerfile_passes_the_checker():
    report = real_report()
    assert report.errors == []
    assert report.instructions[0].keyword in ("ARG", "FROM")


def test_base_is_ngc_pytorch_pinned_through_an_arg():
    report = real_report()
    first = report.instructions[0]
    assert first.keyword == "ARG"
    (name, default), = _assignments(first.args, "ARG")
    assert default and re.fullmatch(r"\d{2}\.\d{2}-py3", default), default
    froms = [i for i in report.instructions if i.keyword == "FROM"]
    assert len(froms) == 1 and "$" in froms[0].args and name in froms[0].args
    assert report.images == [f"nvcr.io/nvidia/pytorch:{default}"]


def test_torch_and_its_stack_come_from_the_image():
    pins = real_report().pip_pins
    for pkg in ("torch", "transformer-engine", "triton", "numpy", "torchvision"):
        assert pkg not in pins, f"{pkg} is the NGC image's and must not be reinstalled"


def test_pins_match_pyproject():
    ours, theirs = real_report().pip_pins, pyproject_pins()
    assert ours["megatron-core"] == theirs["megatron-core"]
    shared = set(ours) & set(theirs)
    assert {"hydra-core", "omegaconf", "tokenizers", "wandb", "matplotlib", "tensorboard",
            "psutil", "pytest"} <= shared
    assert {k: ours[k] for k in shared} == {k: theirs[k] for k in shared}


def test_linear_attention_kernels_and_the_project_are_installed():
    report = real_report()
    assert {"fla-core", "flash-linear-attention"} & set(report.pip_pins)
    assert "-e ." in report.pip_local
    run_text = " ".join(i.args for i in report.instructions if i.keyword == "RUN")
    assert re.search(r"install [^&;]*--no-deps[^&;]*-e \.", run_text)


def test_layout_and_default_command():
    instructions = real_report().instructions
    keywords = [i.keyword for i in instructions]
    assert "ENTRYPOINT" not in keywords and "HEALTHCHECK" not in keywords
    assert [i.args for i in instructions if i.keyword == "WORKDIR"] == ["/workspace/attnres-train"]
    cmd = [json.loads(i.args) for i in instructions if i.keyword == "CMD"]
    assert len(cmd) == 1 and cmd[0][0] == "attnres-train"
    assert cmd[0][1:] in (["--help"], ["model=kimi_linear_48b_a3b", "train.dry_run=true"])
    if len(cmd[0]) > 2:
        assert (ROOT / "configs" / "model" / "kimi_linear_48b_a3b.yaml").is_file()
    # COPY of the context comes after the dependency layer, so code edits keep it cached
    assert keywords.index("COPY") > keywords.index("RUN")


def test_dockerignore_keeps_environments_out_and_sources_in():
    rules = read_dockerignore(DOCKERIGNORE.read_text())
    for path in (".venv", ".venv/bin/python", ".git", ".git/HEAD", "runs/x/metrics.jsonl",
                 "outputs", "wandb", ".cache/data/x", "attnres_train/__pycache__/a.pyc",
                 "__pycache__"):
        assert is_ignored(path, rules), path
    needed = ["pyproject.toml", "README.md", "launch/torchrun.sh"]  # README.md: pyproject's readme
    for top in ("attnres_train", "parallel", "configs"):
        needed += [str(p.relative_to(ROOT)) for p in (ROOT / top).rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts]
    assert len(needed) > 20
    assert [p for p in needed if is_ignored(p, rules)] == []


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not on PATH")
def test_hadolint():
    res = subprocess.run(["hadolint", "--no-color", str(DOCKERFILE)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


# ---------------------------------------------------------------------------------------------
# docker/README.md
# ---------------------------------------------------------------------------------------------

def test_readme_build_command_uses_the_dockerfile():
    text = DOCKER_README.read_text()
    builds = commands_in(text, "docker build")
    assert builds
    for cmd in builds:
        words = shlex.split(cmd)
        assert re.search(r"(-f|--file)[ =]docker/Dockerfile\b", cmd), cmd
        assert words[-1] == ".", f"build context must be the repository root: {cmd}"
    tag = re.search(r"(?:-t|--tag)[ =](\S+)", builds[0]).group(1)
    runs = commands_in(text, "docker run")
    assert runs and all(tag in r for r in runs)
    default_tag = _assignments(real_report().instructions[0].args, "ARG")[0][1]
    assert default_tag in text


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


# ---------------------------------------------------------------------------------------------
# The reader and the checker on small inputs
# ---------------------------------------------------------------------------------------------

GOOD = """\
# syntax=docker/dockerfile:1
ARG TAG=24.01-py3
FROM nvcr.io/nvidia/pytorch:${TAG}
ARG PKG_VERSION=1.2.3
RUN apt-get update \\
 # a comment inside the continuation is dropped
 && apt-get install -y --no-install-recommends curl \\

 && rm -rf /var/lib/apt/lists/*
RUN pip install --no-cache-dir foo==1.0 "bar[x]==2.0" "baz==${PKG_VERSION}" \\
 && pip install --no-cache-dir --no-deps -e .
COPY pyproject.toml ./
CMD ["python", "-c", "print(1)"]
"""


def test_reader_joins_continuations_and_resolves_args():
    ins = parse_dockerfile(GOOD)
    assert [i.keyword for i in ins] == ["ARG", "FROM", "ARG", "RUN", "RUN", "COPY", "CMD"]
    assert [i.line for i in ins] == [2, 3, 4, 5, 10, 12, 13]
    assert "install -y --no-install-recommends curl" in ins[3].args and "comment" not in ins[3].args
    report = check_dockerfile(GOOD, ROOT)
    assert report.errors == []
    assert report.images == ["nvcr.io/nvidia/pytorch:24.01-py3"]
    assert report.pip_pins == {"foo": "1.0", "bar": "2.0", "baz": "1.2.3"}
    assert report.pip_local == ["-e ."]


def test_reader_escape_directive_and_heredoc():
    text = ("# escape=`\nFROM alpine:3.20\nRUN echo a `\n    b\nRUN <<EOF\n"
            "pip install requests\nEOF\nCMD [\"true\"]\n")
    ins = parse_dockerfile(text)
    assert [i.keyword for i in ins] == ["FROM", "RUN", "RUN", "CMD"]
    assert ins[1].args == "echo a     b"
    assert ins[2].heredocs == ("pip install requests",)
    errors = check_dockerfile(text).errors
    assert any("without --no-cache-dir" in e for e in errors)
    assert any("'requests' is not pinned" in e for e in errors)


BAD_CASES = {
    "first instruction": ("RUN echo hi\nFROM ubuntu:24.04\n", "first instruction must be ARG or FROM"),
    "latest": ("FROM ubuntu:latest\n", "floating tag latest"),
    "untagged": ("FROM nvcr.io/nvidia/pytorch\n", "has no tag"),
    "arg without default": ("ARG TAG\nFROM nvcr.io/nvidia/pytorch:${TAG}\n", "without a default"),
    "arg default latest": ("ARG TAG=latest\nFROM python:${TAG}\n", "floating tag latest"),
    "unknown keyword": ("FROM ubuntu:24.04\nRUNN echo hi\n", "unknown instruction"),
    "continued keyword typo": ("FROM ubuntu:24.04\nRUN echo \\\n  hi\nCOPPY a b\n",
                               "line 4: COPPY: unknown instruction"),
    "missing copy source": ("FROM ubuntu:24.04\nCOPY no_such_file.txt /x\n", "does not exist"),
    "copy of an ignored path": ("FROM ubuntu:24.04\nCOPY .venv /x\n", "excluded by .dockerignore"),
    "add local file": ("FROM ubuntu:24.04\nADD pyproject.toml /x\n", "use COPY"),
    "pip cache": ("FROM ubuntu:24.04\nRUN pip install foo==1.0\n", "without --no-cache-dir"),
    "pip unpinned": ("FROM ubuntu:24.04\nRUN pip install --no-cache-dir foo\n", "not pinned"),
    "pip range": ("FROM ubuntu:24.04\nRUN pip install --no-cache-dir 'foo>=1.0'\n", "not pinned"),
    "pip wildcard": ("FROM ubuntu:24.04\nRUN pip install --no-cache-dir 'foo==1.*'\n", "not pinned"),
    "pip upgrade pip": ("FROM ubuntu:24.04\nRUN python3 -m pip install --no-cache-dir -U pip\n",
                        "'pip' is not pinned"),
    "pip later in a chain": ("FROM ubuntu:24.04\nRUN echo a && \\\n    pip3 install --no-cache-dir"
                             " a==1 \\\n    b\n", "'b' is not pinned"),
    "pip requirements file": ("FROM ubuntu:24.04\nRUN pip install --no-cache-dir -r req.txt\n",
                              "list the packages inline"),
    "pip editable remote": ("FROM ubuntu:24.04\nRUN pip install --no-cache-dir -e git+https://x/y\n",
                            "only local paths"),
    "pip unset variable": ("FROM ubuntu:24.04\nRUN pip install --no-cache-dir foo==${V}\n",
                           "unresolved"),
    "apt recommends": ("FROM ubuntu:24.04\nRUN apt-get update && apt-get install -y curl "
                       "&& rm -rf /var/lib/apt/lists/*\n", "--no-install-recommends"),
    "apt no cleanup": ("FROM ubuntu:24.04\nRUN apt-get update && apt-get install -y "
                       "--no-install-recommends curl\n", "rm -rf /var/lib/apt/lists"),
    "apt no update": ("FROM ubuntu:24.04\nRUN apt-get install -y --no-install-recommends curl "
                      "&& rm -rf /var/lib/apt/lists/*\n", "apt-get update before it"),
    "apt no -y": ("FROM ubuntu:24.04\nRUN apt-get update && apt-get install --no-install-recommends"
                  " curl && rm -rf /var/lib/apt/lists/*\n", "without -y"),
    "apt cleanup in another RUN": ("FROM ubuntu:24.04\nRUN apt-get update && apt-get install -y "
                                   "--no-install-recommends curl\nRUN rm -rf /var/lib/apt/lists/*\n",
                                   "rm -rf /var/lib/apt/lists"),
    "shell-form cmd": ("FROM ubuntu:24.04\nCMD attnres-train --help\n", "JSON (exec) form"),
    "maintainer": ("FROM ubuntu:24.04\nMAINTAINER someone\n", "deprecated"),
    "no from": ("ARG X=1\n", "no FROM instruction"),
    "unterminated heredoc": ("FROM ubuntu:24.04\nRUN <<EOF\necho hi\n", "not terminated"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_checker_reports_bad_dockerfiles(case):
    text, expected = BAD_CASES[case]
    errors = check_dockerfile(text, ROOT, DOCKERIGNORE.read_text()).errors
    assert any(expected in e for e in errors), (case, errors)


def test_checker_catches_regressions_of_the_real_dockerfile():
    """Each edit a careless change could make to docker/Dockerfile is reported."""
    real = DOCKERFILE.read_text()
    ignore = DOCKERIGNORE.read_text()
    assert re.search(r"^ARG NGC_TAG=\S+$", real, re.M)
    assert "pip install --no-cache-dir" in real and "megatron-core==" in real
    regressions = {
        "ARG NGC_TAG=latest": re.sub(r"^ARG NGC_TAG=\S+$", "ARG NGC_TAG=latest", real, flags=re.M),
        "cache dir": real.replace("pip install --no-cache-dir", "pip install", 1),
        "unpinned megatron": re.sub(r"megatron-core==\S+", "megatron-core", real),
        "range pin": re.sub(r"wandb==\S+", "'wandb>=0.31'", real),
        "lost copy source": real.replace("COPY . .", "COPY requirements.txt ."),
        "torch reinstall": real.replace("pip install --no-cache-dir \\",
                                        "pip install --no-cache-dir torch \\", 1),
    }
    for name, text in regressions.items():
        assert text != real, name
        assert check_dockerfile(text, ROOT, ignore).errors, name
    drifted = re.sub(r"megatron-core==\S+", "megatron-core==0.0.1", real)
    assert check_dockerfile(drifted, ROOT, ignore).pip_pins["megatron-core"] != \
        pyproject_pins()["megatron-core"]


def test_pinned_packages_exist_as_wheels_for_the_image():
    """Every package the Dockerfile pins resolves, on the package index, to a binary wheel for the
    image's Python (3.12, named in the Dockerfile's header) on x86_64 with Ubuntu 24.04's glibc
    2.39: the build's pip step then downloads and compiles nothing unexpected. pip's resolver runs
    in --dry-run mode from PEP 658 metadata (about a second); skipped only where the index is
    unreachable."""
    import sys

    header = DOCKERFILE.read_text()
    match = re.search(r"with Python (3\.\d+)", header)
    assert match, "the Dockerfile header names the image's Python version"
    python_version = match.group(1)
    pins = real_report().pip_pins
    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(17, 40)] + ["manylinux2014_x86_64"]
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps",
           "--quiet", "--python-version", python_version, "--only-binary=:all:",
           "--target", "/nonexistent-dry-run-target"]
    for platform in platforms:
        cmd += ["--platform", platform]
    cmd += [f"{name}=={version}" for name, version in sorted(pins.items())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and re.search(r"NewConnectionError|Network is unreachable|"
                                          r"Temporary failure in name resolution", proc.stderr):
        pytest.skip("package index unreachable")
    assert proc.returncode == 0, proc.stderr[-3000:]
