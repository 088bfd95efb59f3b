"""Rule-based reward scorers, dispatched by a dataset row's ``data_source``."""

from rlflow.rewards.registry import (
    default_compute_score,
    register_scorer,
    registered_data_sources,
    unregister_scorer,
)

__all__ = [
    "default_compute_score",
    "register_scorer",
    "registered_data_sources",
    "unregister_scorer",
]
