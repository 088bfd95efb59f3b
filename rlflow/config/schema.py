"""Typed configuration schema.

Every key a user can set lives here. The schema is registered as Hydra's primary config, so
OmegaConf runs in struct mode and a misspelt key or a value of the wrong type is an error at
composition time rather than a silently ignored setting hours into a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class ClusterConfig:
    # None starts an embedded local Ray cluster; "auto" or "ray://host:10001" joins an existing one.
    address: Optional[str] = None
    num_cpus: Optional[int] = None
    num_gpus: Optional[int] = None
    include_dashboard: bool = False
    # Loopback by default: the dashboard can submit jobs, so it must not face a network unasked.
    dashboard_host: str = "127.0.0.1"
    namespace: Optional[str] = None
    # Extra environment variables for every worker process (merged into Ray's runtime_env).
    env_vars: Dict[str, str] = field(default_factory=dict)


@dataclass
class ModelConfig:
    # A local HF model folder, or "demo:tiny-char-lm" (created on first use, no download).
    path: str = "demo:tiny-char-lm"
    tokenizer_path: Optional[str] = None
    trust_remote_code: bool = False
    dtype: str = "float32"
    # auto: sdpa where the model's transformers class supports it, else eager (Gemma2 ...);
    # or eager, sdpa, flash_attention_2, flash_attention_3, flex_attention.
    attn_implementation: str = "auto"
    gradient_checkpointing: bool = False
    # Zero every dropout rate of the model's config (as TRL does), so the update scores tokens
    # exactly as the rollout and compute_log_prob do; false keeps the model's own dropout.
    disable_dropout: bool = True


@dataclass
class CustomFunctionConfig:
    path: Optional[str] = None
    name: str = "compute_score"


@dataclass
class DataConfig:
    train_files: List[str] = field(default_factory=lambda: ["demo:arithmetic/train.parquet"])
    val_files: List[str] = field(default_factory=lambda: ["demo:arithmetic/test.parquet"])
    prompt_key: str = "prompt"
    max_prompt_length: int = 16
    max_response_length: int = 4
    # Prompts per step; the rollout turns each into rollout.n responses.
    train_batch_size: int = 32
    val_batch_size: Optional[int] = None
    truncation: str = "error"
    filter_overlong_prompts: bool = True
    shuffle: bool = True
    seed: int = 1
    return_raw_chat: bool = False
    return_full_prompt: bool = False
    apply_chat_template_kwargs: Dict[str, Any] = field(default_factory=dict)
    # Keep the first max_samples prompts after filtering (-1: all).
    max_samples: int = -1
    filter_overlong_prompts_workers: int = 1
    # A user Dataset class in a .py file (instantiated with data_files / tokenizer / config,
    # then its optional setup(config, tokenizer)); rows must look like RLHFDataset's.
    custom_cls: CustomFunctionConfig = field(default_factory=lambda: CustomFunctionConfig(name=""))
    # A DataPacker (rlflow.data.packer) in a .py file whose rollout_collate_fn builds batches.
    packer: CustomFunctionConfig = field(default_factory=lambda: CustomFunctionConfig(name=""))


@dataclass
class RolloutConfig:
    backend: str = "hf"
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    # 0 or a negative value turns top-k filtering off.
    top_k: int = 0
    do_sample: bool = True
    # Validation decodes greedily unless told otherwise.
    val_temperature: float = 0.0
    num_workers: int = 1
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 0.0
    # Ray custom resources per worker; {node_a100: 1} pins the role to nodes that offer node_a100.
    custom_resources: Dict[str, float] = field(default_factory=dict)
    torch_threads: int = 1
    # Sequences per generate() call on one worker; None = the whole shard at once.
    micro_batch_size: Optional[int] = None
    # Token ids that end a response besides the tokenizer's / model's EOS (both backends).
    stop_token_ids: List[int] = field(default_factory=list)
    # Off-policy rollout: how many weight syncs a rollout worker may lag behind the actor.
    # 0 = strictly on-policy (a missed sync is an error).
    max_weight_staleness: int = 0
    # "sync": generate, then train on it (on-policy). "one_step_off": generate the next batch
    # while the actor trains on this one, with weights one sync old. "async": rollout workers
    # generate continuously into a buffer; groups older than max_weight_staleness syncs are
    # dropped and regenerated (docs/async.md).
    mode: str = "sync"
    # async mode: prompts (each with its rollout.n responses) per generate call on one worker.
    # Small calls let a weight sync land soon: a worker applies it between two calls.
    async_prompts_per_call: int = 4
    # async mode: partial rollouts. Responses are generated in segments of at most
    # partial_segment_tokens tokens, one call each, so a weight sync lands between two
    # segments and unfinished responses continue with the new weights (every token records
    # the weight version that sampled it).
    partial_rollout: bool = False
    partial_segment_tokens: int = 64
    # Where rollout workers sit: "split" (their own devices) or "colocated" (the actor's
    # devices, time-shared: on GPU the vLLM engine sleeps between rollouts). Same on CPU.
    # "in_actor": no rollout workers; the actor's one worker samples with the model it trains
    # (HF backend, actor.num_workers=1, sync mode), so a weight sync moves nothing.
    # "auto": in_actor where the run allows it, else split (the single-turn demo recipes).
    placement: str = "split"
    # vLLM backend only (rollout.backend=vllm), see docs/vllm.md.
    tensor_parallel_size: int = 1
    # Fraction of GPU memory the engine may take (weights + KV cache); GPU only.
    gpu_memory_utilization: float = 0.5
    # KV cache size on CPU, in GiB.
    cpu_kv_cache_gib: float = 1.0
    enforce_eager: bool = True
    # None: data.max_prompt_length + data.max_response_length.
    max_model_len: Optional[int] = None
    # Actor -> engine weight transport: "object_store" (Ray object store, CPU or GPU) or
    # "nccl" (broadcast from actor rank 0 to the engines; GPU, split placement).
    weight_sync: str = "object_store"
    # Extra keyword arguments for vllm.LLM (e.g. {block_size: 32, quantization: fp8}); they
    # override rlflow's own engine settings.
    engine_kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    lr_scheduler: str = "constant"
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0


@dataclass
class LoraConfig:
    """LoRA adapters on the actor (see docs/lora.md). On when ``rank > 0`` or ``enable``.

    With LoRA the base weights stay frozen, the reference policy is the base with the adapters
    off (no ref workers), a weight sync ships the adapters only, and checkpoints hold the
    adapters and their optimiser state.
    """

    enable: bool = False
    # 0 turns LoRA off unless enable is true.
    rank: int = 0
    # Adapters are scaled by alpha / rank.
    alpha: float = 16.0
    dropout: float = 0.0
    # "all-linear" (every Linear layer but the output head) or a list of layer names
    # such as [q_proj, v_proj].
    target_modules: Any = "all-linear"
    # What a weight sync ships to the rollout engines: "adapters" (the rollout side applies
    # them to its own base copy) or "merged" (full weights with the adapters merged in).
    sync: str = "adapters"


@dataclass
class OffPolicyConfig:
    """Correction for tokens the rollout engine sampled under a policy that differs from the
    actor's (kernels, precision, stale weights); see docs/off_policy.md.

    ``r = exp(old_log_probs - rollout_log_probs)`` per token. ``tis``: weight ``min(r, is_cap)``;
    ``mis_token``: tokens with ``r`` outside ``[mis_low, mis_high]`` leave the loss;
    ``mis_seq``: the same test on a sequence's geometric-mean ratio drops whole sequences;
    ``decoupled``: weight ``r``, tokens with ``r > is_cap`` leave the loss (AReaL). Any
    correction but ``none`` makes the actor recompute the old log-probs.
    """

    correction: str = "none"
    is_cap: float = 2.0
    mis_low: float = 0.5
    mis_high: float = 2.0


@dataclass
class ActorConfig:
    num_workers: int = 2
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 0.0
    # Ray custom resources per worker; {node_a100: 1} pins the role to nodes that offer node_a100.
    custom_resources: Dict[str, float] = field(default_factory=dict)
    torch_threads: int = 1
    optim: OptimConfig = field(default_factory=OptimConfig)
    # Mini-batch size in prompts (each contributes rollout.n responses); one optimiser step each.
    ppo_mini_batch_size: int = 32
    ppo_micro_batch_size_per_worker: int = 64
    ppo_epochs: int = 1
    shuffle_mini_batches: bool = False
    log_prob_micro_batch_size_per_worker: int = 128
    policy_loss: str = "ppo_clip"
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    # Dual-clip bound for negative advantages (verl uses 3.0); None turns it off.
    clip_ratio_c: Optional[float] = None
    loss_agg_mode: str = "token-mean"
    entropy_coeff: float = 0.0
    use_kl_loss: bool = False
    kl_loss_coef: float = 0.001
    kl_loss_type: str = "k3"
    # "auto": skip the extra forward pass when the update is exactly on-policy
    # (one mini-batch, one epoch), where old log-probs equal the current ones. "rollout": the
    # rollout's own log-probs are the old ones (the PPO ratio is then taken against the policy
    # that sampled each token, with no forward pass; for one_step_off / async).
    recompute_old_log_prob: str = "auto"
    # Micro-batching inside a worker (log-probs and updates). Default: fixed-size micro-batches
    # of padded rows. use_dynamic_bsz: micro-batches of similar-length rows with at most
    # max_tokens_per_microbatch tokens (rows x longest length rounded up to
    # sequence_length_round). use_sequence_packing: rows bin-packed under the same cap, each
    # bin run as one row with no padding (packing_algorithm: NeMo-RL's
    # modified_first_fit_decreasing, first_fit_decreasing, first_fit_shuffle, concatenative,
    # or best_fit_decreasing). At most one of the two; the cap is per worker and per forward pass.
    use_dynamic_bsz: bool = False
    use_sequence_packing: bool = False
    max_tokens_per_microbatch: int = 4096
    sequence_length_round: int = 8
    packing_algorithm: str = "first_fit_decreasing"
    lora: LoraConfig = field(default_factory=LoraConfig)
    off_policy: OffPolicyConfig = field(default_factory=OffPolicyConfig)


@dataclass
class RefConfig:
    # true: the actor's workers also hold the frozen reference (sharded like the actor) and
    # score it; no ref worker processes start. false: the ref role has its own workers.
    in_actor: bool = True
    num_workers: int = 1
    cpus_per_worker: float = 0.25
    gpus_per_worker: float = 0.0
    # Ray custom resources per worker; {node_a100: 1} pins the role to nodes that offer node_a100.
    custom_resources: Dict[str, float] = field(default_factory=dict)
    torch_threads: int = 1
    log_prob_micro_batch_size_per_worker: int = 128
    # Same meaning as the actor's keys of the same names.
    use_dynamic_bsz: bool = False
    use_sequence_packing: bool = False
    max_tokens_per_microbatch: int = 4096
    sequence_length_round: int = 8
    packing_algorithm: str = "first_fit_decreasing"


@dataclass
class CriticConfig:
    """The value model of PPO (spawned only when ``algorithm.adv_estimator=gae``).

    A ``Linear(hidden, 1)`` value head on the backbone of ``model_path`` (default
    ``model.path``), trained with the clipped value loss. Batch sizes follow the actor's
    conventions: ``ppo_mini_batch_size`` counts prompts (each brings ``rollout.n`` responses),
    micro-batch sizes count responses per worker.
    """

    num_workers: int = 1
    cpus_per_worker: float = 0.25
    gpus_per_worker: float = 0.0
    # Ray custom resources per worker; {node_a100: 1} pins the role to nodes that offer node_a100.
    custom_resources: Dict[str, float] = field(default_factory=dict)
    torch_threads: int = 1
    # None: initialise from model.path (the policy's checkpoint), as PPO usually does.
    model_path: Optional[str] = None
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))
    ppo_mini_batch_size: int = 32
    ppo_micro_batch_size_per_worker: int = 64
    forward_micro_batch_size_per_worker: int = 128
    ppo_epochs: int = 1
    shuffle_mini_batches: bool = False
    # Values may move at most this far from the rollout-time values per update (PPO's value clip).
    cliprange_value: float = 0.5
    loss_agg_mode: str = "token-mean"


@dataclass
class OverlongBufferConfig:
    """DAPO's soft overlong punishment: a response whose length enters the last ``len`` tokens
    before ``data.max_response_length`` loses ``penalty_factor * (excess / len)`` reward, growing
    linearly to ``penalty_factor`` at the maximum length."""

    enable: bool = False
    len: int = 0
    penalty_factor: float = 1.0


@dataclass
class RewardConfig:
    # 0: the driver scores each batch itself while the log-prob calls run (a rule reward costs
    # less than shipping the batch to another process); >= 1: reward workers of their own,
    # for slow or heavy scorers (sandboxed code, a model).
    num_workers: int = 0
    cpus_per_worker: float = 0.25
    # Ray custom resources per worker; {node_a100: 1} pins the role to nodes that offer node_a100.
    custom_resources: Dict[str, float] = field(default_factory=dict)
    custom_fn: CustomFunctionConfig = field(default_factory=CustomFunctionConfig)
    # Several reward functions combined: score = sum of weight * component (each logged as
    # reward/<label>). Entries: {path: file.py or null for the built-in registry, name, weight, label}.
    fns: List[Dict[str, Any]] = field(default_factory=list)
    # A scorer that raises or runs longer than timeout_s on one sample gives that sample
    # error_score instead of stalling or failing the step (counted in reward/num_errors).
    timeout_s: Optional[float] = 10.0
    # The whole batch's scoring on one reward worker stops after this long; samples not
    # reached are scored error_score and counted as timed out (null: no batch limit).
    batch_timeout_s: Optional[float] = 60.0
    error_score: float = 0.0
    overlong_buffer: OverlongBufferConfig = field(default_factory=OverlongBufferConfig)


@dataclass
class KLControlConfig:
    """Coefficient of the KL penalty inside the reward (``algorithm.use_kl_in_reward``).

    ``fixed`` keeps ``kl_coef``; ``adaptive`` is the proportional controller of Ziegler et al.
    (2019): after each step the coefficient is multiplied by
    ``1 + clip(kl / target_kl - 1, -0.2, 0.2) * batch_responses / horizon``.
    """

    type: str = "fixed"
    kl_coef: float = 0.001
    target_kl: float = 0.1
    horizon: int = 10000


@dataclass
class FilterGroupsConfig:
    """DAPO's dynamic sampling: keep only prompt groups whose rewards differ, and generate again
    with new prompts until ``data.train_batch_size`` groups are kept or ``max_num_gen_batches``
    generation rounds have run (then train on what was kept)."""

    enable: bool = False
    # "score": the rule reward; "seq_reward": the sequence's total shaped reward (overlong
    # penalty included).
    metric: str = "score"
    max_num_gen_batches: int = 10


@dataclass
class AlgorithmConfig:
    adv_estimator: str = "grpo"
    norm_adv_by_std_in_grpo: bool = True
    gamma: float = 1.0
    lam: float = 1.0
    # Subtract kl_ctrl.value * KL(policy || ref) from each token's reward (classic RLHF PPO).
    use_kl_in_reward: bool = False
    kl_penalty: str = "k1"
    kl_ctrl: KLControlConfig = field(default_factory=KLControlConfig)
    filter_groups: FilterGroupsConfig = field(default_factory=FilterGroupsConfig)


@dataclass
class DPOConfig:
    """Offline preference optimisation (``trainer.algorithm=dpo``).

    Each step takes ``data.train_batch_size`` (prompt, chosen, rejected) pairs and makes one
    optimiser step on the actor; the frozen ``ref`` group supplies reference log-probs.
    """

    beta: float = 0.1
    loss_type: str = "sigmoid"
    # Conservative DPO / robust DPO: the assumed rate of flipped preference labels.
    label_smoothing: float = 0.0
    # Weight of an NLL (SFT) term on the chosen answer, averaged over its tokens.
    sft_loss_coef: float = 0.0
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"


@dataclass
class TrainerConfig:
    project_name: str = "rlflow"
    experiment_name: str = "grpo-demo"
    # None: ./outputs/<experiment_name>/<timestamp> in the launch directory; under a Ray job,
    # $RLFLOW_OUTPUT_ROOT or ~/rlflow_outputs instead of Ray's temporary working directory.
    output_dir: Optional[str] = None
    total_steps: Optional[int] = None
    total_epochs: int = 1
    seed: int = 1
    logger: List[str] = field(default_factory=lambda: ["console"])
    progress_bar: bool = True
    # "rl": on-policy RL (GRPO, PPO, RLOO, ... picked by algorithm.adv_estimator);
    # "dpo": offline preference optimisation.
    algorithm: str = "rl"
    # PPO: train only the critic for this many steps before the actor starts to move.
    critic_warmup: int = 0
    # Validation every test_freq steps (RL: greedy reward on data.val_files as val/...; DPO:
    # held-out preference accuracy); 0 turns it off.
    test_freq: int = 0
    val_before_train: bool = True
    # Checkpoint every save_freq steps (0: never) under <output_dir>/checkpoints, keeping the
    # newest max_ckpt_to_keep (None: all).
    save_freq: int = 0
    max_ckpt_to_keep: Optional[int] = None
    # auto: continue from the newest checkpoint in output_dir if there is one; disable; or a
    # checkpoint folder.
    resume_mode: str = "auto"
    # A dead worker process rebuilds the worker groups and restarts from the last checkpoint,
    # at most this many times per run.
    max_restarts: int = 0
    # Write the final policy as a Hugging Face model folder to <output_dir>/hf_model.
    export_hf: bool = False


@dataclass
class AgentConfig:
    """Multi-turn episodes (docs/agents.md); off by default (single-turn rollouts)."""

    enable: bool = False
    # Built in: "tools" (call agent.tools; a turn without a call is the answer, scored by
    # reward.*) or "guess_number"; or a class name in the file agent.environment_path.
    environment: str = "tools"
    environment_path: Optional[str] = None
    # Built-in tools by name (calculator) or "file.py:function".
    tools: List[str] = field(default_factory=list)
    # hermes (<tool_call>{json}</tool_call>), plain (<tool_call>ARG</tool_call>) or file.py:function.
    tool_parser: str = "hermes"
    max_turns: int = 4
    # Tokens per model turn (None: data.max_response_length, which bounds the whole episode).
    max_tokens_per_turn: Optional[int] = None
    tool_timeout_s: Optional[float] = 10.0
    # An environment step that raises or runs past step_timeout_s ends its episode with
    # error_reward (counted in agent/env_errors).
    step_timeout_s: Optional[float] = 30.0
    error_reward: float = 0.0


@dataclass
class RLFlowConfig:
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    ref: RefConfig = field(default_factory=RefConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def typed_config(config: Any, schema: type = RLFlowConfig) -> Any:
    """``config`` as instances of the schema's dataclasses: values have their declared types
    and keys are attributes, so code reads ``cfg.actor.ppo_epochs`` without casting.

    Accepts the typed object itself (returned as is), a composed ``DictConfig`` or a plain
    dict (what tests and notebooks build by hand); an unknown key or a value of the wrong
    type raises like a command-line override would.
    """
    if isinstance(config, schema):
        return config
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), config))
