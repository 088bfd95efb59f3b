"""Deployment helpers: offline validation of the KubeRay manifests in ``docker/kuberay/``.

The images and manifests themselves live in ``docker/``; ``docs/deploy.md`` shows how to use them.
Names are re-exported lazily so that ``python -m rlflow.deploy.manifest_check`` does not import
the module twice (once through this package, once as ``__main__``).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CRDNotFoundError",
    "ManifestError",
    "load_crd_schemas",
    "strict_schema",
    "validate_file",
    "validate_manifest",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from rlflow.deploy import manifest_check

        return getattr(manifest_check, name)
    raise AttributeError(f"module 'rlflow.deploy' has no attribute {name!r}")
