"""The quickstart notebook runs top to bottom in a fresh Jupyter kernel.

The kernel is a separate process with its own local Ray cluster: it gets a private HOME and
Ray temp dir (``RAY_TMPDIR``), an explicit ``RAY_AUTH_MODE`` and no ``RAY_ADDRESS``, so it
neither joins nor disturbs the test session's cluster or anyone else's on the machine.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import psutil
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "examples" / "notebooks" / "quickstart.ipynb"
TOTAL_TIMEOUT_S = 300
KERNEL_NAME = "rlflow-test-python"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_kernelspec(root: Path) -> Path:
    """A kernelspec that runs this interpreter, so the kernel sees the same packages."""
    spec_dir = root / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "rlflow test",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return root


def _processes_mentioning(text: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(text in arg for arg in proc.info["cmdline"] or ()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


@pytest.fixture
def kernel_sandbox(monkeypatch):
    """Private HOME / Ray temp root for the kernel; afterwards, no Ray process may remain there."""
    # Short: Ray's Unix socket paths live under it and are limited to ~100 characters.
    root = Path(tempfile.mkdtemp(prefix="rlfnb-", dir="/tmp"))
    (root / "home").mkdir()
    monkeypatch.setenv("JUPYTER_PATH", str(_write_kernelspec(root / "jupyter")))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    try:
        yield root
    finally:
        ray_root = str(root / "ray")
        deadline = time.monotonic() + 30
        leftovers = _processes_mentioning(ray_root)
        while leftovers and time.monotonic() < deadline:
            time.sleep(1)
            leftovers = _processes_mentioning(ray_root)
        for proc in leftovers:  # only processes of the kernel's own cluster, by pid
            try:
                proc.kill()
            except psutil.Error:
                pass
        shutil.rmtree(root, ignore_errors=True)
        assert not leftovers, f"Ray processes of the notebook's cluster outlived the kernel: {leftovers}"


@pytest.mark.long
def test_quickstart_notebook_runs_in_fresh_kernel(kernel_sandbox, tmp_path):
    root = kernel_sandbox
    workdir = tmp_path / "nb"
    workdir.mkdir()
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(
        HOME=str(root / "home"),
        RAY_TMPDIR=str(root),  # Ray puts its sessions under $RAY_TMPDIR/ray
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        RLFLOW_CACHE=os.environ["RLFLOW_CACHE"],  # demo assets shared with the test session
        MPLBACKEND="Agg",
        PYDEVD_DISABLE_FILE_VALIDATION="1",
    )
    # The notebook's default output folder is then ./outputs under the kernel's cwd.
    for key in ("RLFLOW_OUTPUT_ROOT", "RAY_JOB_CONFIG_JSON_ENV_VAR", "RAY_JOB_ID"):
        env.pop(key, None)

    nb = nbformat.read(NOTEBOOK, as_version=4)
    deadline = time.monotonic() + TOTAL_TIMEOUT_S

    def remaining(_cell) -> int:  # one budget for the whole notebook, not per cell
        return max(1, int(deadline - time.monotonic()))

    client = NotebookClient(
        nb,
        kernel_name=KERNEL_NAME,
        timeout_func=remaining,
        startup_timeout=120,
        allow_errors=False,
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute(env=env)

    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code_cells), "every code cell must have run"
    for cell in code_cells:
        assert not [o for o in cell.outputs if o.output_type == "error"], cell.source

    plot_cells = [c for c in code_cells if "plot" in c.metadata.get("tags", [])]
    assert len(plot_cells) == 1
    images = [o for o in plot_cells[0].outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1, plot_cells[0].outputs
    png = base64.b64decode(images[0]["data"]["image/png"])
    assert png.startswith(PNG_MAGIC) and len(png) > 5_000

    # The run wrote its default folder under the kernel's working directory, all 40 steps.
    runs = list((workdir / "outputs" / "notebook-grpo").iterdir())
    assert len(runs) == 1
    lines = (runs[0] / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 41))
    assert (runs[0] / "reward.png").read_bytes() == png

    # The table cell shows the last 10 steps of the metrics.
    table_cell = next(c for c in code_cells if "read_metrics" in c.source)
    html = next(o["data"]["text/html"] for o in table_cell.outputs if "text/html" in o.get("data", {}))
    assert "reward/mean" in html and "<th>40</th>" in html and "<th>31</th>" in html
    assert "<th>30</th>" not in html
