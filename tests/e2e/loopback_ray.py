"""A real multi-node Ray cluster on one machine, for end-to-end tests.

Each node is a ``ray start --block`` process, joined through 127.0.0.1, with its own ports
and custom resources; all share a private HOME and Ray temp dir and run with
``RAY_AUTH_MODE=disabled``. ``--block`` keeps every Ray process of a node (GCS, raylet,
dashboard, workers) a descendant of the process we started, so ``stop()`` ends exactly
those, by pid. ``ray stop`` is not used: it kills every Ray process on the machine,
other users' clusters included.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import psutil

RAY_BIN = str(Path(sys.executable).with_name("ray"))

# Run in a subprocess: the test process may already be connected to the session's cluster.
_NODES_SCRIPT = """
import json, sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
want, deadline = int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= want or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print(json.dumps([{"node_id": n["NodeID"], "resources": n["Resources"]} for n in alive]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackCluster:
    """Start with ``start_head`` then ``add_node``; always ``stop()`` (it is idempotent)."""

    def __init__(self, prefix: str = "rlfray-") -> None:
        # Short path: Ray's Unix sockets live under the temp dir (~100 character limit).
        self.root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self.temp_dir = self.root / "ray"
        self.home = self.root / "home"
        self.home.mkdir()
        self.logs = self.root / "logs"
        self.logs.mkdir()
        self.gcs_port: Optional[int] = None
        self.dashboard_port: Optional[int] = None
        self._procs: list[subprocess.Popen] = []
        env = dict(os.environ)
        for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RLFLOW_OUTPUT_ROOT", "RAY_JOB_CONFIG_JSON_ENV_VAR",
                    "RAY_JOB_ID"):
            env.pop(key, None)
        env.update(
            HOME=str(self.home),
            RAY_AUTH_MODE="disabled",
            RAY_USAGE_STATS_ENABLED="0",
            PYTHONUNBUFFERED="1",
            # Job entrypoints say `python`: make it this interpreter, with rlflow installed.
            PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        )
        self.env = env

    @property
    def address(self) -> str:
        """GCS address, for ``cluster.address`` and ``ray start --address``."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        if self.dashboard_port is None:
            raise RuntimeError("the head was started without the dashboard")
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.logs / f"{name}.log", "wb")
        proc = subprocess.Popen(
            [RAY_BIN, "start", "--block", "--disable-usage-stats", *args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
        )
        log.close()
        self._procs.append(proc)

    def start_head(self, num_cpus: int, resources: dict[str, float], dashboard: bool = False) -> None:
        self.gcs_port = free_port()
        args = [
            "--head", f"--port={self.gcs_port}", f"--num-cpus={num_cpus}",
            f"--resources={json.dumps(resources)}", f"--temp-dir={self.temp_dir}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
        ]
        if dashboard:
            self.dashboard_port = free_port()
            args += [
                "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
            ]
        else:
            args.append("--include-dashboard=false")
        self._start("head", args)

    def add_node(self, num_cpus: int, resources: dict[str, float]) -> None:
        if self.gcs_port is None:
            raise RuntimeError("start the head first")
        self._start(f"node{len(self._procs)}", [
            f"--address={self.address}", f"--num-cpus={num_cpus}",
            f"--resources={json.dumps(resources)}",
            f"--dashboard-agent-listen-port={free_port()}",
        ])

    def wait_for_nodes(self, count: int, timeout_s: float = 150.0) -> list[dict]:
        """Block until ``count`` nodes are alive; returns ``[{node_id, resources}]``."""
        deadline = time.monotonic() + timeout_s
        while True:  # the head's GCS must accept connections before a driver can join
            dead = [p for p in self._procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"a Ray node exited early; logs:\n{self.read_logs()}")
            try:
                with socket.create_connection(("127.0.0.1", self.gcs_port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the Ray head did not come up; logs:\n{self.read_logs()}")
                time.sleep(0.5)
        left = max(5.0, deadline - time.monotonic())
        out = subprocess.run(
            [sys.executable, "-c", _NODES_SCRIPT, self.address, str(count), str(left)],
            env=self.env, capture_output=True, text=True, timeout=left + 60,
        )
        if out.returncode != 0:
            raise RuntimeError(f"cannot list the cluster's nodes: {out.stderr[-2000:]}")
        nodes = json.loads(out.stdout.strip().splitlines()[-1])
        if len(nodes) < count:
            raise TimeoutError(f"only {len(nodes)} of {count} Ray nodes came up; logs:\n{self.read_logs()}")
        return nodes

    def wait_for_dashboard(self, timeout_s: float = 120.0) -> None:
        """Block until the Jobs API answers (the dashboard starts after the GCS)."""
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Ray dashboard did not come up; logs:\n{self.read_logs()}")
            time.sleep(1)

    def read_logs(self) -> str:
        parts = [f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.logs.iterdir()]
        return "\n".join(parts)

    def processes(self) -> list[psutil.Process]:
        """Every live process of this cluster: the ``ray start`` processes and their descendants."""
        found: dict[int, psutil.Process] = {}
        for popen in self._procs:
            try:
                parent = psutil.Process(popen.pid)
                for proc in [parent, *parent.children(recursive=True)]:
                    found[proc.pid] = proc
            except psutil.Error:
                continue
        return list(found.values())

    def stop(self, grace_s: float = 30.0) -> list[int]:
        """SIGTERM each node (Ray then stops its own processes), SIGKILL what is left after
        ``grace_s``; returns the pids that needed SIGKILL. Worker nodes go before the head."""
        tree = self.processes()
        for popen in reversed(self._procs):
            if popen.poll() is None:
                popen.terminate()
        for popen in reversed(self._procs):
            try:
                popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(timeout=10)
        _, alive = psutil.wait_procs(tree, timeout=10)
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                pass
        self._procs.clear()
        return [p.pid for p in alive]

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
