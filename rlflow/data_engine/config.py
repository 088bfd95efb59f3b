"""Typed config of ``python -m rlflow.data_engine``: the training schema plus ``engine``.

Model, data, rollout, reward and cluster keys mean what they mean for training, so a user
points the engine at the same model and prompts with the same overrides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from rlflow.config.schema import CustomFunctionConfig, RLFlowConfig

STAGES = ("sample", "score", "pair", "write")
SCORERS = ("rule", "reward_model", "implicit")


@dataclass
class PairingConfig:
    strategy: str = "best_vs_worst"
    # A pair needs chosen_score - rejected_score > margin (ties never pair).
    margin: float = 0.0
    k: int = 1
    max_pairs_per_prompt: int = 1
    # A pairwise judge(prompt, answer_a, answer_b) -> 1 | -1 | 0, for strategy=judge.
    judge: CustomFunctionConfig = field(default_factory=lambda: CustomFunctionConfig(name="judge"))


@dataclass
class ImplicitRewardConfig:
    """Score = beta * (log pi(answer) - log ref(answer)) summed over the answer's tokens."""

    policy_path: Optional[str] = None
    ref_path: Optional[str] = None
    beta: float = 0.1


@dataclass
class EngineConfig:
    # All stage outputs live here; rerunning the same command resumes.
    work_dir: Optional[str] = None
    stages: List[str] = field(default_factory=lambda: list(STAGES))
    # Stages to recompute even if finished (e.g. [score] after changing the scorer).
    rerun: List[str] = field(default_factory=list)
    # Prompts per shard: the unit of work that a restart never recomputes.
    shard_size: int = 64
    # Samples per prompt (the rollout settings control temperature etc.).
    num_samples: int = 8
    max_prompts: Optional[int] = None
    scorer: str = "rule"
    reward_model_path: Optional[str] = None
    implicit: ImplicitRewardConfig = field(default_factory=ImplicitRewardConfig)
    pairing: PairingConfig = field(default_factory=PairingConfig)
    test_fraction: float = 0.0
    seed: int = 1
    # Keep per-sample intermediate outputs (texts, token ids, scores) in debug/.
    debug: bool = False
    progress_bar: bool = True


@dataclass
class DataEngineRunConfig(RLFlowConfig):
    engine: EngineConfig = field(default_factory=EngineConfig)
