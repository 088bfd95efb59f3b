"""KubeRay manifests and their offline validator.

The shipped RayJob and RayCluster must pass the KubeRay v1.7.0 CRD schemas (made strict) and
the operator's rules; each planted mistake must be reported with the offending field's path.
The CRDs come from ../shared/kuberay-crds (or $RLFLOW_KUBERAY_CRDS); without them these tests
fail rather than skip, since an unchecked manifest is what they exist to prevent.
"""

from __future__ import annotations

import copy
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from jsonschema import Draft7Validator

import rlflow

REPO_ROOT = Path(rlflow.__file__).resolve().parent.parent
# The validator is repository tooling (tools/), not part of the installed package.
sys.path.insert(0, str(REPO_ROOT / "tools"))
import manifest_check  # noqa: E402
from manifest_check import strict_schema, validate_file, validate_manifest  # noqa: E402

MANIFEST_DIR = REPO_ROOT / "docker" / "kuberay"
RAYJOB = MANIFEST_DIR / "rayjob.yaml"
RAYCLUSTER = MANIFEST_DIR / "raycluster.yaml"


@pytest.fixture(scope="module")
def crd_dir() -> Path:
    try:
        return manifest_check.resolve_crd_dir()
    except manifest_check.CRDNotFoundError as exc:
        pytest.fail(f"cannot validate the KubeRay manifests: {exc}", pytrace=False)


def load(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


@pytest.fixture
def rayjob() -> dict[str, Any]:
    return load(RAYJOB)


@pytest.fixture
def raycluster() -> dict[str, Any]:
    return load(RAYCLUSTER)


def all_pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [group["template"]["spec"] for group in groups]


# ------------------------------------------------------------------ shipped manifests are valid
@pytest.mark.parametrize("path", [RAYJOB, RAYCLUSTER], ids=["rayjob", "raycluster"])
def test_shipped_manifest_is_valid(path: Path, crd_dir: Path) -> None:
    assert validate_file(path, crd_dir) == []


def test_cli_accepts_shipped_and_rejects_broken(tmp_path: Path, rayjob: dict[str, Any], crd_dir: Path) -> None:
    command = [sys.executable, str(REPO_ROOT / "tools" / "manifest_check.py"), "--crds", str(crd_dir)]
    ok = subprocess.run([*command, str(RAYJOB), str(RAYCLUSTER)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.splitlines() == [f"{RAYJOB}: ok", f"{RAYCLUSTER}: ok"]

    rayjob["spec"]["submissionMode"] = "K8sMode"
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(rayjob))
    bad = subprocess.run([*command, str(broken)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert bad.stdout.splitlines() == [
        f"{broken}: spec.submissionMode: 'K8sMode' is not one of K8sJobMode, HTTPMode, InteractiveMode, SidecarMode"
    ]

    missing = subprocess.run([*command, str(tmp_path / "nope.yaml")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2
    assert "nope.yaml: cannot read the manifest" in missing.stderr


# ------------------------------------------------------------------- planted mistakes are caught
def _rename_shutdown(doc: dict[str, Any]) -> None:
    doc["spec"]["shutdownAfterJobFinish"] = doc["spec"].pop("shutdownAfterJobFinishes")


def _replicas_word(doc: dict[str, Any]) -> None:
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"


def _min_above_max(doc: dict[str, Any]) -> None:
    group = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    group.update(minReplicas=3, replicas=1, maxReplicas=1)


def _ttl_without_shutdown(doc: dict[str, Any]) -> None:
    doc["spec"]["shutdownAfterJobFinishes"] = False


def _empty_head_containers(doc: dict[str, Any]) -> None:
    doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"] = []


def _bad_submission_mode(doc: dict[str, Any]) -> None:
    doc["spec"]["submissionMode"] = "K8sMode"


HEAD = "spec.rayClusterSpec.headGroupSpec.template.spec"
GROUP = "spec.rayClusterSpec.workerGroupSpecs[0]"


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            # The misspelt key would be pruned by the API server, leaving the TTL without effect.
            _rename_shutdown,
            [
                "spec.shutdownAfterJobFinish: unknown field; did you mean 'shutdownAfterJobFinishes'?",
                "spec.ttlSecondsAfterFinished: only takes effect with shutdownAfterJobFinishes: true; "
                "set spec.shutdownAfterJobFinishes: true or remove the TTL",
            ],
        ),
        (_replicas_word, [f"{GROUP}.replicas: 'two' is not of type 'integer'"]),
        (
            _min_above_max,
            [
                f"{GROUP}.minReplicas: 3 is greater than maxReplicas 1; need minReplicas <= maxReplicas",
                f"{GROUP}.replicas: 1 is below minReplicas 3; need minReplicas <= replicas <= maxReplicas",
            ],
        ),
        (
            _ttl_without_shutdown,
            [
                "spec.ttlSecondsAfterFinished: only takes effect with shutdownAfterJobFinishes: true; "
                "set spec.shutdownAfterJobFinishes: true or remove the TTL"
            ],
        ),
        (
            _empty_head_containers,
            [f"{HEAD}.containers: the head group needs at least one container (the Ray container comes first)"],
        ),
        (
            _bad_submission_mode,
            ["spec.submissionMode: 'K8sMode' is not one of K8sJobMode, HTTPMode, InteractiveMode, SidecarMode"],
        ),
    ],
    ids=["shutdown-typo", "replicas-word", "min-above-max", "ttl-without-shutdown", "no-head-container", "bad-mode"],
)
def test_planted_mistake_is_reported_at_its_field(
    rayjob: dict[str, Any], crd_dir: Path, mutate: Callable[[dict[str, Any]], None], expected: list[str]
) -> None:
    mutate(rayjob)
    assert validate_manifest(rayjob, crd_dir) == expected


def test_missing_head_containers_key_is_reported_by_schema_and_rule(rayjob: dict[str, Any], crd_dir: Path) -> None:
    del rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    errors = validate_manifest(rayjob, crd_dir)
    assert f"{HEAD}: 'containers' is a required property" in errors
    assert any(e.startswith(f"{HEAD}.containers: the head group needs") for e in errors)


def test_rayjob_needs_a_cluster_spec_or_selector(rayjob: dict[str, Any], crd_dir: Path) -> None:
    del rayjob["spec"]["rayClusterSpec"]
    rayjob["spec"]["shutdownAfterJobFinishes"] = True
    assert validate_manifest(rayjob, crd_dir) == [
        "spec.rayClusterSpec: a RayJob needs rayClusterSpec (a cluster to create) or clusterSelector "
        "(an existing cluster); set one of them"
    ]
    rayjob["spec"]["clusterSelector"] = {"ray.io/cluster": "rlflow-dev"}
    assert validate_manifest(rayjob, crd_dir) == []


def test_nested_typos_and_types_in_pod_templates(rayjob: dict[str, Any], crd_dir: Path) -> None:
    worker = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    container = worker["containers"][0]
    container["env"][0]["value"] = 1  # YAML `value: 1` is an int; Kubernetes wants a string
    container["resources"]["limits"]["nvidia.com/gpu"] = "4 GPUs"
    container["volumeMount"] = container.pop("volumeMounts")
    worker_path = f"{GROUP}.template.spec.containers[0]"
    errors = validate_manifest(rayjob, crd_dir)
    assert f"{worker_path}.env[0].value: 1 is not of type 'string'" in errors
    gpu_limit = f"{worker_path}.resources.limits['nvidia.com/gpu']"
    assert any(e.startswith(f"{gpu_limit}: '4 GPUs' does not match") for e in errors)
    assert f"{worker_path}.volumeMount: unknown field; did you mean 'volumeMounts'?" in errors
    assert len(errors) == 3


def test_ray_start_params_must_be_strings(raycluster: dict[str, Any], crd_dir: Path) -> None:
    raycluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    assert validate_manifest(raycluster, crd_dir) == [
        "spec.headGroupSpec.rayStartParams.num-cpus: 0 is not of type 'string'"
    ]


def test_raycluster_replica_rules(raycluster: dict[str, Any], crd_dir: Path) -> None:
    group = raycluster["spec"]["workerGroupSpecs"][0]
    group["replicas"] = 5
    assert validate_manifest(raycluster, crd_dir) == [
        "spec.workerGroupSpecs[0].replicas: 5 is above maxReplicas 4; need minReplicas <= replicas <= maxReplicas"
    ]
    group["replicas"] = 0
    group["minReplicas"] = -1
    assert validate_manifest(raycluster, crd_dir) == ["spec.workerGroupSpecs[0].minReplicas: must be >= 0, got -1"]
    group["minReplicas"] = 0
    del group["maxReplicas"]
    assert validate_manifest(raycluster, crd_dir) == ["spec.workerGroupSpecs[0]: 'maxReplicas' is a required property"]


def test_worker_group_needs_a_container(raycluster: dict[str, Any], crd_dir: Path) -> None:
    raycluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"] = []
    assert validate_manifest(raycluster, crd_dir) == [
        "spec.workerGroupSpecs[0].template.spec.containers: a worker group needs at least one container"
    ]


@pytest.mark.parametrize(("version", "ok"), [(None, False), ("2.51.0", False), ("2.52.0", True), ("2.60.0", True)])
def test_token_auth_needs_recent_ray_version(
    raycluster: dict[str, Any], crd_dir: Path, version: Any, ok: bool
) -> None:
    raycluster["spec"].pop("rayVersion")
    if version is not None:
        raycluster["spec"]["rayVersion"] = version
    errors = validate_manifest(raycluster, crd_dir)
    if ok:
        assert errors == []
    else:
        assert len(errors) == 1 and errors[0].startswith("spec.rayVersion: authOptions.mode 'token' needs")


def test_header_errors(rayjob: dict[str, Any], crd_dir: Path) -> None:
    bad = copy.deepcopy(rayjob)
    bad["apiVersion"] = "ray.io/v2"
    bad["metadata"] = {"labels": {"a": "b"}}
    bad["specs"] = {}
    assert validate_manifest(bad, crd_dir) == [
        "apiVersion: 'ray.io/v2' is not served for RayJob by KubeRay v1.7.0; use ray.io/v1 or ray.io/v1alpha1",
        "metadata.name: missing; give the resource a name (lowercase letters, digits and '-')",
        "specs: unknown field; did you mean 'spec'?",
    ]
    rayjob["metadata"]["name"] = "RLflow_GRPO"
    assert validate_manifest(rayjob, crd_dir) == [
        "metadata.name: 'RLflow_GRPO' is not a DNS-1035 label; use lowercase letters, digits and '-', "
        "starting with a letter"
    ]
    rayjob["kind"] = "RayService"
    assert validate_manifest(rayjob, crd_dir) == [
        "kind: 'RayService' is not a KubeRay kind this checker knows; use one of RayCluster, RayJob"
    ]
    rayjob["kind"] = ["RayJob"]
    assert validate_manifest(rayjob, crd_dir) == [
        "kind: ['RayJob'] is not a KubeRay kind this checker knows; use one of RayCluster, RayJob"
    ]
    assert validate_manifest(["not", "a", "mapping"], crd_dir) == [
        "<root>: expected a mapping with apiVersion, kind, metadata and spec, got list"
    ]


def test_validate_file_reports_each_document(
    tmp_path: Path, rayjob: dict[str, Any], raycluster: dict[str, Any], crd_dir: Path
) -> None:
    raycluster["spec"]["workerGroupSpecs"][0]["replicas"] = 9
    both = tmp_path / "both.yaml"
    both.write_text(yaml.safe_dump_all([rayjob, raycluster]))
    assert validate_file(both, crd_dir) == [
        f"{both} (document 2): spec.workerGroupSpecs[0].replicas: 9 is above maxReplicas 4; "
        "need minReplicas <= replicas <= maxReplicas"
    ]
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    with pytest.raises(manifest_check.ManifestError, match="broken.yaml: not valid YAML"):
        validate_file(broken, crd_dir)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    with pytest.raises(manifest_check.ManifestError, match="empty.yaml: holds no YAML document"):
        validate_file(empty, crd_dir)


# ------------------------------------------------------------------------------ CRD location
def test_crd_dir_from_env_var_accepts_parent_or_version_folder(
    crd_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RLFLOW_KUBERAY_CRDS", str(crd_dir))
    assert manifest_check.resolve_crd_dir() == crd_dir
    monkeypatch.setenv("RLFLOW_KUBERAY_CRDS", str(crd_dir.parent))
    assert manifest_check.resolve_crd_dir() == crd_dir
    monkeypatch.setenv("RLFLOW_KUBERAY_CRDS", str(tmp_path))
    with pytest.raises(manifest_check.CRDNotFoundError, match="set RLFLOW_KUBERAY_CRDS to the folder"):
        validate_manifest(load(RAYJOB))


# --------------------------------------------------------------------------------- strict_schema
def test_strict_schema_closes_objects_with_properties_only() -> None:
    crd = {
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "properties": {
                    "groups": {"type": "array", "items": {"type": "object", "properties": {"n": {"type": "integer"}}}},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "metadata": {"type": "object"},
                    "choice": {"anyOf": [{"type": "object", "properties": {"a": {"type": "string"}}}]},
                },
            }
        },
    }
    original = copy.deepcopy(crd)
    strict = strict_schema(crd)
    assert crd == original  # input untouched
    spec = strict["properties"]["spec"]
    assert strict["additionalProperties"] is False
    assert spec["additionalProperties"] is False
    assert spec["properties"]["groups"]["items"]["additionalProperties"] is False
    assert spec["properties"]["choice"]["anyOf"][0]["additionalProperties"] is False
    assert spec["properties"]["labels"]["additionalProperties"] == {"type": "string"}  # a map stays a map
    assert "additionalProperties" not in spec["properties"]["metadata"]  # no properties: stays open

    validator = Draft7Validator(strict)
    good = {"spec": {"groups": [{"n": 1}], "labels": {"x": "y"}, "metadata": {"anything": 1}, "choice": {"a": "b"}}}
    assert list(validator.iter_errors(good)) == []
    for bad in (
        {"spec": {"grups": []}},
        {"spec": {"groups": [{"n": 1, "m": 2}]}},
        {"spec": {"labels": {"x": 1}}},
        {"spec": {"choice": {"b": "c"}}},
        {"extra": 1},
    ):
        assert list(validator.iter_errors(bad)), bad


def test_strict_schema_extensions() -> None:
    crd = {
        "type": "object",
        "properties": {
            "quantity": {"x-kubernetes-int-or-string": True, "type": "string"},
            "port": {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True},
            "free": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "properties": {"k": {"type": "string"}},
            },
            "maybe": {"type": "string", "nullable": True, "enum": ["a", "b"]},
        },
    }
    strict = strict_schema(crd)
    assert strict["properties"]["quantity"] == {
        "x-kubernetes-int-or-string": True,
        "anyOf": [{"type": "integer"}, {"type": "string"}],
    }
    assert "additionalProperties" not in strict["properties"]["free"]
    validator = Draft7Validator(strict)
    for good in ({"quantity": 3}, {"quantity": "3Gi"}, {"port": 8265}, {"port": "http"},
                 {"free": {"k": "v", "other": [1, 2]}}, {"maybe": None}, {"maybe": "a"}):
        assert list(validator.iter_errors(good)) == [], good
    for bad in ({"quantity": 1.5}, {"quantity": True}, {"port": [1]}, {"free": {"k": 1}}, {"maybe": "c"}):
        assert list(validator.iter_errors(bad)), bad
    with pytest.raises(TypeError, match="crd_openapi_schema must be a mapping"):
        strict_schema(["not", "a", "schema"])  # type: ignore[arg-type]


def test_real_crd_schema_is_strict_everywhere(crd_dir: Path) -> None:
    schemas = manifest_check.load_crd_schemas(crd_dir)
    assert set(schemas) == {"RayJob", "RayCluster"}
    assert {v: info["served"] for v, info in schemas["RayJob"].items()} == {"v1": True, "v1alpha1": True}

    def open_nodes(node: Any, path: str) -> list[str]:
        found = []
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                found.append(path)
            if "x-kubernetes-int-or-string" in node and "type" in node:
                found.append(path + " (int-or-string with type)")
            for key, value in node.items():
                found += open_nodes(value, f"{path}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                found += open_nodes(value, f"{path}/{i}")
        return found

    for kind, versions in schemas.items():
        for version, info in versions.items():
            assert open_nodes(info["schema"], f"{kind}/{version}") == []


# --------------------------------------------------------------- what the manifests promise
def test_rayjob_contract(rayjob: dict[str, Any]) -> None:
    spec = rayjob["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env["env_vars"], dict) and runtime_env["env_vars"]
    assert all(isinstance(v, str) for v in runtime_env["env_vars"].values())
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1


def test_every_pod_has_memory_shm_and_explicit_auth_mode(rayjob: dict[str, Any], raycluster: dict[str, Any]) -> None:
    for doc in (rayjob, raycluster):
        for pod in all_pod_specs(doc):
            shm = [v["name"] for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
            for container in pod["containers"]:
                mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
                assert mounts.get("/dev/shm") in shm, (doc["kind"], container["name"])
                env = {e["name"]: e.get("value") for e in container["env"]}
                assert env.get("RAY_AUTH_MODE") == "token", (doc["kind"], container["name"])
            assert pod["securityContext"]["runAsNonRoot"] is True


def test_rayjob_outputs_land_on_a_durable_volume_in_every_pod(rayjob: dict[str, Any]) -> None:
    tokens = shlex.split(rayjob["spec"]["entrypoint"])
    output_dir = next(t.split("=", 1)[1] for t in tokens if t.startswith("trainer.output_dir="))
    for pod in all_pod_specs(rayjob):
        durable = {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v or "hostPath" in v}
        container = pod["containers"][0]
        covering = [
            m for m in container["volumeMounts"]
            if m["name"] in durable and Path(output_dir).is_relative_to(m["mountPath"])
        ]
        assert covering, f"{container['name']}: {output_dir} is not on a mounted PVC or hostPath volume"


def test_rayjob_entrypoint_is_a_valid_rlflow_run_that_fits_the_cluster(rayjob: dict[str, Any]) -> None:
    from rlflow.config.compose import compose_config
    from rlflow.trainer.config_checks import check_config

    tokens = shlex.split(rayjob["spec"]["entrypoint"])
    assert tokens[:3] == ["python", "-m", "rlflow.main"] and "+recipe=grpo" in tokens
    cfg = compose_config(overrides=tokens[3:])
    check_config(cfg)
    assert cfg.cluster.address == "auto"  # join the RayJob's cluster, never start a local one

    roles = [cfg.actor, cfg.rollout] + ([cfg.ref] if cfg.actor.use_kl_loss else [])
    gpus_needed = sum(role.num_workers * role.gpus_per_worker for role in roles)
    groups = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus_available = sum(
        g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for g in groups
    )
    assert 0 < gpus_needed <= gpus_available


def test_raycluster_contract(raycluster: dict[str, Any]) -> None:
    spec = raycluster["spec"]
    head = spec["headGroupSpec"]
    ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert {10001, 8265} <= ports
    # KubeRay defaults dashboard-host to 0.0.0.0; the interactive cluster keeps it on loopback.
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert spec["enableInTreeAutoscaling"] is True
    (group,) = spec["workerGroupSpecs"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert group["minReplicas"] < group["maxReplicas"]  # room to scale
    assert int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1
