"""rlflow: Ray-native post-training of language models with GRPO, PPO and DPO."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy so that `import rlflow` stays cheap (no torch / ray import) for tools and workers.
    if name in ("compose_config", "build_trainer", "train"):
        from rlflow import api

        return getattr(api, name)
    if name == "read_metrics":
        from rlflow.trainer.tracking import read_metrics

        return read_metrics
    raise AttributeError(f"module 'rlflow' has no attribute {name!r}")


__all__ = ["compose_config", "build_trainer", "train", "read_metrics", "__version__"]
