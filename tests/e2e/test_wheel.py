"""rlflow works from an installed wheel, from any working directory."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory):
    build = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(build), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )
    [wheel] = glob.glob(str(build / "rlflow-*.whl"))
    site = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), wheel],
        check=True, capture_output=True, timeout=300,
    )
    return site


def run_installed(site, args, cwd, tmp_path):
    # PYTHONPATH puts the installed copy ahead of the editable checkout on sys.path.
    env = dict(os.environ, PYTHONPATH=str(site), RAY_AUTH_MODE="disabled", RLFLOW_CACHE=str(tmp_path / "cache"))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_installed_wheel_finds_recipes_and_demo_generator(wheel_site, tmp_path):
    code = (
        "import rlflow, rlflow.utils.bundled as b; "
        "print(rlflow.__file__); print(b.bundled_dir('recipes')); "
        "from rlflow.demo.assets import ensure_demo_data; print(ensure_demo_data()['train'])"
    )
    proc = run_installed(wheel_site, ["-c", code], tmp_path, tmp_path)
    assert proc.returncode == 0, proc.stderr
    module_file, recipes, train = proc.stdout.split()
    assert module_file.startswith(str(wheel_site))
    assert recipes.startswith(str(wheel_site)) and recipes.endswith("_bundled/recipes")
    assert os.path.isfile(train)


def test_installed_wheel_cli_from_another_directory(wheel_site, tmp_path):
    listed = run_installed(wheel_site, ["-m", "rlflow.main", "--list-recipes"], tmp_path, tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "grpo" in listed.stdout.split()
    shown = run_installed(wheel_site, ["-m", "rlflow.main", "+recipe=grpo", "--cfg"], tmp_path, tmp_path)
    assert shown.returncode == 0 and "adv_estimator: grpo" in shown.stdout
    missing = run_installed(wheel_site, ["-m", "rlflow.main", "+recipe=nope"], tmp_path, tmp_path)
    assert missing.returncode == 2 and "unknown recipe 'nope'" in missing.stderr
