"""Offline validation of KubeRay manifests (RayJob, RayCluster) against the KubeRay CRDs.

Two layers, both without a cluster:

1. **Schema.** The CRD's ``openAPIV3Schema`` for the manifest's ``apiVersion`` is made strict
   (see :func:`strict_schema`) and the whole document is checked with a JSON Schema Draft 7
   validator. Strict matters: the Kubernetes API server prunes unknown fields of a custom
   resource, so a misspelt ``shutdownAfterJobFinish`` would be dropped and the cluster would
   never be deleted. Here it is an error.
2. **Operator rules** the schema cannot express, mirroring the KubeRay operator's own checks
   (``ray-operator/controllers/ray/utils/validation.go``): a RayJob needs ``rayClusterSpec`` or
   ``clusterSelector``; a positive ``ttlSecondsAfterFinished`` needs
   ``shutdownAfterJobFinishes: true``; ``minReplicas <= replicas <= maxReplicas`` and none is
   negative; every group has a container;
   ``submissionMode`` is a known mode; token auth needs ``rayVersion >= 2.52.0``; names are
   DNS-1035 labels short enough for the names the operator derives from them.

The CRDs are read from ``$RLFLOW_KUBERAY_CRDS`` if set, else from ``../shared/kuberay-crds``
next to the repository root; either the folder holding ``ray.io_rayjobs.yaml`` and
``ray.io_rayclusters.yaml`` or its parent with a ``v1.7.0/`` subfolder.

Command line::

    python tools/manifest_check.py docker/kuberay/rayjob.yaml docker/kuberay/raycluster.yaml

prints one line per error and exits 1 if any manifest is invalid, 2 if a file or the CRDs
cannot be read, 0 otherwise.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from jsonschema import Draft7Validator, FormatChecker

KUBERAY_VERSION = "v1.7.0"
CRDS_ENV_VAR = "RLFLOW_KUBERAY_CRDS"
API_GROUP = "ray.io"
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
MIN_TOKEN_AUTH_RAY_VERSION = (2, 52, 0)
# The operator derives pod, service and submitter-job names from the resource name and rejects
# names that would not fit in a 63-character label once suffixed.
MAX_NAME_LENGTH = {"RayCluster": 53, "RayJob": 47}
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_MAX_MESSAGE = 240
_REPLICA_ORDER = "need minReplicas <= replicas <= maxReplicas"

PathLike = Union[str, os.PathLike]


class ManifestError(ValueError):
    """A manifest file that cannot be read, is not YAML, or holds no document."""


class CRDNotFoundError(FileNotFoundError):
    """The KubeRay CRD folder is missing or lacks a CRD file."""


# ------------------------------------------------------------------------- schema loading
def strict_schema(crd_openapi_schema: Mapping[str, Any]) -> dict[str, Any]:
    """Turn a CRD version's ``openAPIV3Schema`` into a strict JSON Schema (a new dict).

    - ``additionalProperties: false`` is added to every node that lists ``properties`` and sets
      no ``additionalProperties``, so unknown fields are errors instead of being pruned;
    - ``x-kubernetes-preserve-unknown-fields: true`` keeps its node open (no
      ``additionalProperties`` is added there), as the API server does;
    - ``x-kubernetes-int-or-string: true`` accepts an integer or a string: any ``type`` is
      dropped and ``anyOf: [{type: integer}, {type: string}]`` is used unless one is given;
    - ``nullable: true`` also accepts ``null``.

    Everything else (``format``, ``pattern``, ``enum``, ``required``, ...) is kept as is; the
    ``x-kubernetes-*`` markers that JSON Schema does not know are ignored by the validator.
    The input is not modified.
    """
    if not isinstance(crd_openapi_schema, Mapping):
        raise TypeError(
            "crd_openapi_schema must be a mapping (a CRD version's schema.openAPIV3Schema), "
            f"got {type(crd_openapi_schema).__name__}"
        )
    return _strict_node(crd_openapi_schema)


def _strict_node(node: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties" and isinstance(value, Mapping):
            out[key] = {name: _strict_node(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, Mapping):
            out[key] = _strict_node(value)
        elif key in ("anyOf", "allOf", "oneOf", "items") and isinstance(value, list):
            out[key] = [_strict_node(sub) if isinstance(sub, Mapping) else sub for sub in value]
        else:
            out[key] = _plain_copy(value)
    if node.get("x-kubernetes-int-or-string") is True:
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") is True:
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        if isinstance(out.get("enum"), list) and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
    preserve_unknown = node.get("x-kubernetes-preserve-unknown-fields") is True
    if "properties" in out and "additionalProperties" not in out and not preserve_unknown:
        out["additionalProperties"] = False
    return out


def _plain_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_copy(v) for v in value]
    return value


def default_crd_dir() -> Path:
    """``$RLFLOW_KUBERAY_CRDS`` if set and non-empty, else ``<repo root>/../shared/kuberay-crds``."""
    env = os.environ.get(CRDS_ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser()
    repo_root = Path(__file__).resolve().parents[1]
    return repo_root.parent / "shared" / "kuberay-crds"


def resolve_crd_dir(crd_dir: Optional[PathLike] = None) -> Path:
    """The folder holding the CRD files: ``crd_dir`` (default :func:`default_crd_dir`) itself or
    its ``v1.7.0/`` subfolder. Raises :class:`CRDNotFoundError` naming the fix if neither has
    every file."""
    base = Path(crd_dir).expanduser() if crd_dir is not None else default_crd_dir()
    for candidate in (base, base / KUBERAY_VERSION):
        if all((candidate / name).is_file() for name in CRD_FILES.values()):
            return candidate.resolve()
    raise CRDNotFoundError(
        f"KubeRay CRDs not found: neither {base} nor {base / KUBERAY_VERSION} holds "
        f"{' and '.join(sorted(CRD_FILES.values()))}; set {CRDS_ENV_VAR} to the folder with the "
        f"KubeRay {KUBERAY_VERSION} CRDs (ray-operator/config/crd/bases in ray-project/kuberay)"
    )


def load_crd_schemas(crd_dir: Optional[PathLike] = None) -> dict[str, dict[str, dict[str, Any]]]:
    """``{kind: {version: {"served": bool, "storage": bool, "schema": strict schema}}}`` for
    RayJob and RayCluster, read once per folder and cached (treat the result as read-only)."""
    return _load_crd_schemas(str(resolve_crd_dir(crd_dir)))


@lru_cache(maxsize=4)
def _load_crd_schemas(folder: str) -> dict[str, dict[str, dict[str, Any]]]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader is ~10x faster on 2 MB
    result: dict[str, dict[str, dict[str, Any]]] = {}
    for kind, filename in CRD_FILES.items():
        path = Path(folder) / filename
        with open(path, encoding="utf-8") as f:
            crd = yaml.load(f, Loader=loader)
        spec = crd.get("spec", {}) if isinstance(crd, Mapping) else {}
        if spec.get("group") != API_GROUP or spec.get("names", {}).get("kind") != kind:
            raise CRDNotFoundError(f"{path} is not the {API_GROUP} {kind} CustomResourceDefinition")
        result[kind] = {
            version["name"]: {
                "served": bool(version.get("served")),
                "storage": bool(version.get("storage")),
                "schema": strict_schema(version["schema"]["openAPIV3Schema"]),
            }
            for version in spec.get("versions", [])
        }
    return result


@lru_cache(maxsize=16)
def _validator(folder: str, kind: str, version: str) -> Draft7Validator:
    schema = _load_crd_schemas(folder)[kind][version]["schema"]
    return Draft7Validator(schema, format_checker=_FORMAT_CHECKER)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_FORMAT_CHECKER = FormatChecker(formats=())


@_FORMAT_CHECKER.checks("int32")
def _is_int32(value: Any) -> bool:
    return not _is_int(value) or -(2**31) <= value < 2**31


@_FORMAT_CHECKER.checks("int64")
def _is_int64(value: Any) -> bool:
    return not _is_int(value) or -(2**63) <= value < 2**63


# ------------------------------------------------------------------------------ validation
def validate_manifest(doc: Any, crd_dir: Optional[PathLike] = None) -> list[str]:
    """Errors for one parsed manifest (a mapping as loaded from YAML); empty when valid.

    Each error is one line ``<field path>: <what is wrong>``, the path in dotted form with list
    indices, e.g. ``spec.rayClusterSpec.workerGroupSpecs[0].replicas: 'two' is not of type
    'integer'``. Raises :class:`CRDNotFoundError` if the CRDs cannot be found.
    """
    folder = str(resolve_crd_dir(crd_dir))
    schemas = _load_crd_schemas(folder)
    if not isinstance(doc, Mapping):
        return [f"<root>: expected a mapping with apiVersion, kind, metadata and spec, got {type(doc).__name__}"]
    kind = doc.get("kind")
    if not isinstance(kind, str) or kind not in schemas:
        return [f"kind: {kind!r} is not a KubeRay kind this checker knows; use one of {', '.join(sorted(schemas))}"]

    errors: list[str] = []
    versions = schemas[kind]
    served = [f"{API_GROUP}/{name}" for name, info in versions.items() if info["served"]]
    api_version = doc.get("apiVersion")
    if api_version in served:
        version = str(api_version).split("/", 1)[1]
    else:
        errors.append(
            f"apiVersion: {api_version!r} is not served for {kind} by KubeRay {KUBERAY_VERSION}; "
            f"use {' or '.join(served)}"
        )
        # Keep checking against the storage version so one run reports every mistake.
        version = next(name for name, info in versions.items() if info["storage"])

    errors.extend(_metadata_errors(kind, doc.get("metadata")))
    errors.extend(_schema_errors(_validator(folder, kind, version), doc, f"{kind} {API_GROUP}/{version}"))

    spec = doc.get("spec")
    if spec is None:
        errors.append(f"spec: missing; a {kind} needs a spec")
    elif isinstance(spec, Mapping):
        if kind == "RayJob":
            errors.extend(_rayjob_rules(spec))
        else:
            errors.extend(_cluster_rules(spec, "spec"))
    return errors


def validate_file(path: PathLike, crd_dir: Optional[PathLike] = None) -> list[str]:
    """Errors for every YAML document in ``path``, each prefixed with ``<path>: `` (and the
    document number when the file holds several). Raises :class:`ManifestError` if the file
    cannot be read or parsed, or holds no document."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read the manifest ({exc.strerror or exc})") from exc
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ManifestError(f"{path}: not valid YAML ({first})") from exc
    if not docs:
        raise ManifestError(f"{path}: holds no YAML document; expected a RayJob or RayCluster manifest")
    errors: list[str] = []
    for index, doc in enumerate(docs):
        where = f"{path}" if len(docs) == 1 else f"{path} (document {index + 1})"
        errors.extend(f"{where}: {error}" for error in validate_manifest(doc, crd_dir))
    return errors


def _metadata_errors(kind: str, metadata: Any) -> list[str]:
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    if not isinstance(name, str) or not name:
        return ["metadata.name: missing; give the resource a name (lowercase letters, digits and '-')"]
    errors = []
    if not _DNS1035_LABEL.match(name):
        errors.append(
            f"metadata.name: {name!r} is not a DNS-1035 label; use lowercase letters, digits and '-', "
            "starting with a letter"
        )
    if len(name) > MAX_NAME_LENGTH[kind]:
        errors.append(f"metadata.name: {name!r} is longer than {MAX_NAME_LENGTH[kind]} characters, the {kind} limit")
    return errors


def _schema_errors(validator: Draft7Validator, doc: Mapping[str, Any], schema_name: str) -> list[str]:
    errors: list[str] = []
    for err in validator.iter_errors(doc):
        path = list(err.absolute_path)
        closed = err.validator == "additionalProperties" and err.validator_value is False
        if closed and isinstance(err.instance, Mapping):
            # One line per unknown key, with the path to the key itself and a spelling hint.
            known = sorted(err.schema.get("properties", {}))
            for extra in sorted(set(err.instance) - set(known), key=str):
                hint = difflib.get_close_matches(str(extra), known, n=1, cutoff=0.6)
                advice = f"did you mean {hint[0]!r}?" if hint else f"it is not in the {schema_name} schema"
                errors.append(f"{_render_path([*path, extra])}: unknown field; {advice}")
            continue
        message = err.message if len(err.message) <= _MAX_MESSAGE else err.message[: _MAX_MESSAGE - 3] + "..."
        errors.append(f"{_render_path(path)}: {message}")
    return sorted(errors)


def _render_path(parts: Sequence[Any]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", str(part)):
            out += f".{part}" if out else str(part)
        else:
            out += f"[{str(part)!r}]"  # keys such as nvidia.com/gpu would read as nested fields
    return out or "<root>"


def _get(node: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return node


def _rayjob_rules(spec: Mapping[str, Any]) -> list[str]:
    errors: list[str] = []
    cluster_spec = spec.get("rayClusterSpec")
    if not cluster_spec and not spec.get("clusterSelector"):
        errors.append(
            "spec.rayClusterSpec: a RayJob needs rayClusterSpec (a cluster to create) or "
            "clusterSelector (an existing cluster); set one of them"
        )
    ttl = spec.get("ttlSecondsAfterFinished")
    shutdown = spec.get("shutdownAfterJobFinishes") is True
    if _is_int(ttl) and ttl < 0:
        errors.append(f"spec.ttlSecondsAfterFinished: must be >= 0, got {ttl}")
    if _is_int(ttl) and ttl > 0 and not shutdown:
        errors.append(
            "spec.ttlSecondsAfterFinished: only takes effect with shutdownAfterJobFinishes: true; "
            "set spec.shutdownAfterJobFinishes: true or remove the TTL"
        )
    if spec.get("suspend") is True and not shutdown:
        errors.append("spec.suspend: a suspended RayJob needs spec.shutdownAfterJobFinishes: true")
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode not in SUBMISSION_MODES:
        errors.append(f"spec.submissionMode: {mode!r} is not one of {', '.join(SUBMISSION_MODES)}")
    if isinstance(cluster_spec, Mapping):
        errors.extend(_cluster_rules(cluster_spec, "spec.rayClusterSpec"))
    return errors


def _cluster_rules(spec: Mapping[str, Any], where: str) -> list[str]:
    errors: list[str] = []
    head_containers = _get(spec, "headGroupSpec", "template", "spec", "containers")
    if not isinstance(head_containers, list) or not head_containers:
        errors.append(
            f"{where}.headGroupSpec.template.spec.containers: the head group needs at least one "
            "container (the Ray container comes first)"
        )
    groups = spec.get("workerGroupSpecs")
    for index, group in enumerate(groups if isinstance(groups, list) else []):
        if isinstance(group, Mapping):
            errors.extend(_worker_group_rules(group, f"{where}.workerGroupSpecs[{index}]"))
    if _get(spec, "authOptions", "mode") == "token":
        errors.extend(_token_auth_rules(spec.get("rayVersion"), where))
    return errors


def _worker_group_rules(group: Mapping[str, Any], where: str) -> list[str]:
    # The v1.7.0 schema already requires minReplicas and maxReplicas, so only their values
    # are checked here.
    errors: list[str] = []
    containers = _get(group, "template", "spec", "containers")
    if not isinstance(containers, list) or not containers:
        errors.append(f"{where}.template.spec.containers: a worker group needs at least one container")
    low, count, high = (group.get(key) for key in ("minReplicas", "replicas", "maxReplicas"))
    for key, value in (("minReplicas", low), ("replicas", count), ("maxReplicas", high)):
        if _is_int(value) and value < 0:
            errors.append(f"{where}.{key}: must be >= 0, got {value}")
    if _is_int(low) and _is_int(high) and low > high:
        errors.append(f"{where}.minReplicas: {low} is greater than maxReplicas {high}; need minReplicas <= maxReplicas")
    if _is_int(count) and _is_int(low) and count < low:
        errors.append(f"{where}.replicas: {count} is below minReplicas {low}; {_REPLICA_ORDER}")
    if _is_int(count) and _is_int(high) and count > high:
        errors.append(f"{where}.replicas: {count} is above maxReplicas {high}; {_REPLICA_ORDER}")
    return errors


def _token_auth_rules(ray_version: Any, where: str) -> list[str]:
    need = ".".join(map(str, MIN_TOKEN_AUTH_RAY_VERSION))
    parsed = _parse_version(ray_version)
    if parsed is None:
        return [
            f"{where}.rayVersion: authOptions.mode 'token' needs rayVersion set to the image's Ray version (>= {need})"
        ]
    if parsed < MIN_TOKEN_AUTH_RAY_VERSION:
        return [f"{where}.rayVersion: authOptions.mode 'token' needs Ray >= {need}, got {ray_version!r}"]
    return []


def _parse_version(value: Any) -> Optional[tuple[int, ...]]:
    match = re.match(r"^v?(\d+)\.(\d+)(?:\.(\d+))?", value) if isinstance(value, str) else None
    if match is None:
        return None
    return tuple(int(part or 0) for part in match.groups())


# ---------------------------------------------------------------------------------- CLI
def main(argv: Optional[Iterable[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python tools/manifest_check.py",
        description=f"Validate KubeRay RayJob/RayCluster manifests offline against the KubeRay {KUBERAY_VERSION} CRDs.",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="manifest YAML files")
    parser.add_argument("--crds", default=None, help=f"CRD folder (default: ${CRDS_ENV_VAR} or ../shared/kuberay-crds)")
    args = parser.parse_args(None if argv is None else list(argv))
    failed = False
    try:
        for path in args.files:
            errors = validate_file(path, args.crds)
            for error in errors:
                print(error)
            if not errors:
                print(f"{path}: ok")
            failed = failed or bool(errors)
    except (ManifestError, CRDNotFoundError) as exc:
        print(f"manifest_check: error: {exc}", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
