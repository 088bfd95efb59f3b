"""Shared pytest fixtures."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

# The real model and datasets of tests/real are fetched once into the user's rlflow cache and
# reused by every run; fix their folder before the private cache below replaces RLFLOW_CACHE.
if not os.environ.get("RLFLOW_REAL_PARTS"):
    from tools.real_parts import real_parts_root

    os.environ["RLFLOW_REAL_PARTS"] = str(real_parts_root())

# Demo assets (tiny model, parquet) are built once per test session in a private cache, never
# in the user's ~/.cache; set at import so every Ray worker started later inherits it.
os.environ.setdefault("RLFLOW_CACHE", tempfile.mkdtemp(prefix="rlflow-test-cache-"))

# Session-wide Ray settings: 2 CPUs matches the workplace machines and CI.
RAY_TEST_NUM_CPUS = 2


def pytest_collection_modifyitems(session, config, items) -> None:
    """Tests marked ``before_ray`` assert that nothing starts Ray, which only means something
    before the session's cluster starts: run them first, whatever their file is called."""
    items.sort(key=lambda item: item.get_closest_marker("before_ray") is None)  # stable


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[dict]:
    """A local Ray cluster (``RAY_TEST_NUM_CPUS`` CPUs) shared by the whole session.

    Yields ``ray.cluster_resources()``. Ray runs with a private HOME and temp dir, so it
    neither reads nor writes ``~/.ray`` (auth tokens) or the shared ``/tmp/ray`` of other
    clusters on the machine, and with ``RAY_AUTH_MODE`` set explicitly.
    """
    import ray

    from rlflow.distributed.ray_cluster import init_ray, shutdown_ray

    if ray.is_initialized():
        raise RuntimeError("Ray is already initialised in the test process; use the ray_cluster fixture only")
    # Short path: Ray's Unix sockets live under it and are limited to ~100 characters.
    root = tempfile.mkdtemp(prefix="rlflow-ray-", dir="/tmp")
    saved = {k: os.environ.get(k) for k in ("HOME", "RAY_AUTH_MODE", "RAY_ADDRESS")}
    os.environ.pop("RAY_ADDRESS", None)  # never join a cluster the developer has running
    os.environ["HOME"] = root  # Ray's processes, started now, keep this HOME
    try:
        resources = init_ray(num_cpus=RAY_TEST_NUM_CPUS, temp_dir=os.path.join(root, "ray"))
    finally:
        # The test process itself goes back to the real HOME (caches, configs).
        if saved["HOME"] is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = saved["HOME"]
    try:
        yield resources
    finally:
        shutdown_ray()
        for key, value in saved.items():
            if key == "HOME":
                continue
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(root, ignore_errors=True)
