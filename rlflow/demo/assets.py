"""Offline demo assets: a tiny character-level LM and a synthetic arithmetic dataset.

``python -m rlflow.main +recipe=grpo`` must run with no download, so the default config points
at ``demo:`` paths that are built locally on first use and cached::

    demo:tiny-char-lm                 -> HF model folder (config, safetensors, tokenizer)
    demo:arithmetic                   -> folder with train.parquet and test.parquet
    demo:arithmetic/train.parquet     -> 2048 rows of "a+b=" prompts
    demo:arithmetic/test.parquet      -> 256 rows
    demo:arithmetic_preference        -> folder with preference pairs (correct answer chosen
                                         over a wrong one) for DPO: train.parquet, test.parquet
    demo:tiny-tool-lm                 -> the tiny LM warm-started on calculator tool calls
    demo:calculator                   -> folder with "AB+CD=" prompts for the tool task
                                         (both built by rlflow.demo.tool_model)

Cache layout: ``<cache_root()>/demo/v<DEMO_VERSION>/<name>-<fingerprint>``. The fingerprint is
a hash of every constant that shapes the asset (vocabulary, chat template, model sizes, seeds,
dataset sizes), so tuning a constant below produces a fresh folder instead of silently reusing
a stale one. Bump ``DEMO_VERSION`` when the *code* that builds an asset changes.

Creation is atomic: an asset is built in a temporary folder next to its target and renamed into
place. Several Ray workers may resolve the same path at once; the first rename wins and the
others discard their copy and use the winner's.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from rlflow.utils.atomic import atomic_folder

DEMO_VERSION = "1"
DEMO_PREFIX = "demo:"

# ---- tokenizer -----------------------------------------------------------------------------
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
EOS_TOKEN = "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, *ROLE_TOKENS, EOS_TOKEN)
# Deliberately tiny: an untrained policy samples the right digit with probability ~1/len(vocab),
# which has to be large enough for RL to find any reward at all.
CHARACTERS = "0123456789+-*=() ."
# Each message renders as "<|role|>content<|end|>"; the generation prompt opens the assistant
# turn. Unknown roles are rejected because they would tokenize into <unk> characters.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unsupported role ' + message['role'] + '; use system, user or assistant') }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# ---- model (LlamaForCausalLM, random init) -------------------------------------------------
MODEL_SEED = 0
HIDDEN_SIZE = 64
INTERMEDIATE_SIZE = 256
NUM_HIDDEN_LAYERS = 2
# Two heads of 32: vLLM's CPU attention kernels have no head size 16, and the demo must run
# on both rollout backends.
NUM_ATTENTION_HEADS = 2
NUM_KEY_VALUE_HEADS = 2
MAX_POSITION_EMBEDDINGS = 128
TIE_WORD_EMBEDDINGS = True
INITIALIZER_RANGE = 0.02

# ---- arithmetic data -----------------------------------------------------------------------
DATA_SEED = 0
TRAIN_SIZE = 2048
TEST_SIZE = 256
MAX_OPERAND = 4
OPS = ("+",)

# ---- guess-the-number episodes (multi-turn demo): a secret in [0, GUESS_MAX] per row ---------
GUESS_MAX = 7
GUESS_TRAIN_SIZE = 2048

# ---- arithmetic preference pairs (DPO) ------------------------------------------------------
PREFERENCE_TRAIN_SIZE = 2048
PREFERENCE_TEST_SIZE = 256

MODEL_NAME = "tiny-char-lm"
DATA_NAME = "arithmetic"
PREFERENCE_DATA_NAME = "arithmetic_preference"
GUESS_DATA_NAME = "guess_number"
TOOL_MODEL_NAME = "tiny-tool-lm"
CALCULATOR_DATA_NAME = "calculator"
DATA_FILES = ("train.parquet", "test.parquet")


class DemoAssetError(ValueError):
    """An unknown ``demo:`` name, or a demo asset that cannot be created."""


def cache_root() -> Path:
    """Root of rlflow's cache: ``$RLFLOW_CACHE`` if set (and non-empty), else ``~/.cache/rlflow``."""
    env = os.environ.get("RLFLOW_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "rlflow"


def _fingerprint(spec: dict) -> str:
    payload = json.dumps(spec, sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()[:10]


def _model_spec() -> dict:
    return {
        "special_tokens": list(SPECIAL_TOKENS),
        "characters": CHARACTERS,
        "chat_template": CHAT_TEMPLATE,
        "seed": MODEL_SEED,
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": INTERMEDIATE_SIZE,
        "num_hidden_layers": NUM_HIDDEN_LAYERS,
        "num_attention_heads": NUM_ATTENTION_HEADS,
        "num_key_value_heads": NUM_KEY_VALUE_HEADS,
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "tie_word_embeddings": TIE_WORD_EMBEDDINGS,
        "initializer_range": INITIALIZER_RANGE,
    }


def _data_spec() -> dict:
    return {
        "seed": DATA_SEED,
        "train_size": TRAIN_SIZE,
        "test_size": TEST_SIZE,
        "max_operand": MAX_OPERAND,
        "ops": list(OPS),
    }


def _preference_data_spec() -> dict:
    return {
        "seed": DATA_SEED,
        "train_size": PREFERENCE_TRAIN_SIZE,
        "test_size": PREFERENCE_TEST_SIZE,
        "max_operand": MAX_OPERAND,
        "ops": list(OPS),
    }


def _demo_dir() -> Path:
    return cache_root() / "demo" / f"v{DEMO_VERSION}"


def _build_atomically(target: Path, build: Callable[[Path], None]) -> Path:
    """Return ``target``, building it with ``build(tmp_dir)`` first if it does not exist.

    Only complete folders are ever renamed to ``target``, so its existence means it is usable.
    """
    if target.is_dir():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DemoAssetError(
            f"cannot create the demo cache folder {target.parent} ({exc.strerror or exc}); "
            "set RLFLOW_CACHE to a writable folder"
        ) from exc
    # Several workers may build at once: the first complete copy wins, the others are dropped.
    atomic_folder(str(target), lambda tmp: build(Path(tmp)))
    return target


def build_demo_tokenizer(
    extra_special_tokens: tuple[str, ...] = (),
    extra_tokens: tuple[str, ...] = (),
    chat_template: str = CHAT_TEMPLATE,
):
    """Build the character-level tokenizer (a ``PreTrainedTokenizerFast``) in memory.

    Ids: the special tokens first (``<pad>`` = 0), then one id per character of ``CHARACTERS``,
    then ``extra_special_tokens`` and ``extra_tokens`` (both empty for the demo model). The
    extras come last so that a derived tokenizer keeps every id of the demo one. Extra special
    tokens are dropped by ``decode(..., skip_special_tokens=True)`` like the role tokens; extra
    plain tokens are still one id each but survive that decoding, so markup such as a tool-call
    tag stays visible in decoded text. Characters outside the vocabulary map to ``<unk>``.
    Decoding concatenates tokens with no separator, so ``decode(encode(text)) == text`` for
    in-vocabulary text.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = (*SPECIAL_TOKENS, *CHARACTERS, *extra_special_tokens, *extra_tokens)
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise DemoAssetError("demo CHARACTERS must not repeat a character or a special token")
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # One pre-token per character (whitespace included), so WordLevel sees single characters.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # The default WordLevel decoding joins tokens with spaces; Fuse concatenates them.
    backend.decoder = decoders.Fuse()
    # Registering them as special makes "<|user|>" in rendered chat text one token, not 8 chars.
    backend.add_special_tokens([*SPECIAL_TOKENS, *extra_special_tokens])
    if extra_tokens:
        # Added (not special) tokens are matched whole before pre-tokenization as well.
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra_tokens])

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        eos_token=EOS_TOKEN,
        additional_special_tokens=[*ROLE_TOKENS, *extra_special_tokens],
        model_max_length=MAX_POSITION_EMBEDDINGS,
        padding_side="left",
    )
    tokenizer.chat_template = chat_template
    _check_round_trip(tokenizer)
    return tokenizer


def _check_round_trip(tokenizer) -> None:
    # Guards against a tokenizers/transformers upgrade changing pre-tokenization or decoding.
    sample = CHARACTERS + CHARACTERS[::-1]
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    decoded = tokenizer.decode(ids)
    if len(ids) != len(sample) or decoded != sample:
        raise DemoAssetError(
            f"demo tokenizer does not round-trip: {sample!r} -> {len(ids)} ids -> {decoded!r}"
        )


def build_demo_model(tokenizer):
    """Build the randomly initialised ``LlamaForCausalLM`` (float32, seeded by ``MODEL_SEED``)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_HIDDEN_LAYERS,
        num_attention_heads=NUM_ATTENTION_HEADS,
        num_key_value_heads=NUM_KEY_VALUE_HEADS,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        initializer_range=INITIALIZER_RANGE,
        tie_word_embeddings=TIE_WORD_EMBEDDINGS,
        # The vocabulary has no dedicated BOS token; like GPT-2, the end token doubles as BOS.
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    # fork_rng keeps the caller's global torch RNG stream untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(MODEL_SEED)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def _write_model(folder: Path) -> None:
    tokenizer = build_demo_tokenizer()
    model = build_demo_model(tokenizer)
    from transformers.utils import logging as hf_logging

    # Progress bars for a 1 MB model are noise on the console (and in one-line error output).
    hf_logging.disable_progress_bar()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def build_splits(name: str, spec: dict, write: Callable[[Path], None]) -> dict[str, str]:
    """``{"train": path, "test": path}`` of the demo dataset ``name``: the folder keyed by the
    fingerprint of ``spec``, written by ``write(folder)`` first if it does not exist."""
    folder = _build_atomically(_demo_dir() / f"{name}-{_fingerprint(spec)}", write)
    return {split: str(folder / f"{split}.parquet") for split in ("train", "test")}


def ensure_demo_model() -> str:
    """Return the path of the demo model folder, creating it on first use."""
    target = _demo_dir() / f"{MODEL_NAME}-{_fingerprint(_model_spec())}"
    return str(_build_atomically(target, _write_model))


def _write_data(folder: Path) -> None:
    from rlflow.utils.bundled import import_data_preprocess

    arithmetic = import_data_preprocess("arithmetic")
    arithmetic.write_splits(
        folder,
        train_size=TRAIN_SIZE,
        test_size=TEST_SIZE,
        seed=DATA_SEED,
        max_operand=MAX_OPERAND,
        ops=OPS,
    )


def ensure_demo_data() -> dict[str, str]:
    """Return ``{"train": path, "test": path}`` of the demo parquet files, creating them first."""
    return build_splits(DATA_NAME, _data_spec(), _write_data)


def _write_preference_data(folder: Path) -> None:
    from rlflow.utils.bundled import import_data_preprocess

    pairs = import_data_preprocess("arithmetic_preference")
    pairs.write_splits(
        folder,
        train_size=PREFERENCE_TRAIN_SIZE,
        test_size=PREFERENCE_TEST_SIZE,
        seed=DATA_SEED,
        max_operand=MAX_OPERAND,
        ops=OPS,
    )


def ensure_demo_preference_data() -> dict[str, str]:
    """Return ``{"train": path, "test": path}`` of the demo preference pairs, creating them first.

    Prompts are the demo arithmetic prompts (same seed and operands); each pair prefers the
    correct answer over a wrong one.
    """
    return build_splits(PREFERENCE_DATA_NAME, _preference_data_spec(), _write_preference_data)


def _write_guess_data(folder: Path) -> None:
    import random

    from rlflow.utils.bundled import import_data_preprocess

    def rows(size: int, seed: int, split: str) -> list[dict]:
        rng = random.Random(seed)
        return [{
            "data_source": GUESS_DATA_NAME,
            "prompt": [{"role": "user", "content": f"0-{GUESS_MAX}"}],
            "reward_model": {"style": "rule", "ground_truth": str(rng.randint(0, GUESS_MAX))},
            "extra_info": {"split": split, "index": i},
        } for i in range(size)]

    import_data_preprocess("_preprocess_io").write_splits(
        {"train": rows(GUESS_TRAIN_SIZE, DATA_SEED, "train"), "test": rows(TEST_SIZE, DATA_SEED + 1, "test")},
        folder,
    )


def ensure_guess_data() -> dict[str, str]:
    """``{"train": path, "test": path}`` of the guess-the-number rows (prompt ``0-7``, the
    secret as ground truth), created first."""
    spec = {"seed": DATA_SEED, "max": GUESS_MAX, "train_size": GUESS_TRAIN_SIZE, "test_size": TEST_SIZE}
    return build_splits(GUESS_DATA_NAME, spec, _write_guess_data)


# The tool-use assets live in their own module, which imports this one: import it on use.
def _ensure_tool_model() -> str:
    from rlflow.demo.tool_model import ensure_tool_model

    return ensure_tool_model()


def _ensure_calculator_data() -> dict[str, str]:
    from rlflow.demo.tool_model import ensure_calculator_data

    return ensure_calculator_data()


# demo model name -> function that builds it and returns its folder
_MODELS: dict[str, Callable[[], str]] = {
    MODEL_NAME: ensure_demo_model,
    TOOL_MODEL_NAME: _ensure_tool_model,
}

# demo data name -> function that builds it and returns {"train": path, "test": path}
_DATASETS: dict[str, Callable[[], dict[str, str]]] = {
    DATA_NAME: ensure_demo_data,
    PREFERENCE_DATA_NAME: ensure_demo_preference_data,
    GUESS_DATA_NAME: ensure_guess_data,
    CALCULATOR_DATA_NAME: _ensure_calculator_data,
}


def _valid_names() -> list[str]:
    names = list(_MODELS)
    for data_name in _DATASETS:
        names += [data_name, *(f"{data_name}/{f}" for f in DATA_FILES)]
    return names


def resolve_demo_path(path: str) -> str:
    """Map a ``demo:`` path to a real local path (building the asset if needed).

    Any other path is returned unchanged. Unknown demo names raise ``DemoAssetError``.
    """
    if not isinstance(path, str):
        if isinstance(path, os.PathLike):
            return path
        raise TypeError(f"resolve_demo_path(path={path!r}): expected a str path, got {type(path).__name__}")
    if not path.startswith(DEMO_PREFIX):
        return path
    name = path[len(DEMO_PREFIX):].strip("/")
    if name in _MODELS:
        return _MODELS[name]()
    data_name, _, file_name = name.partition("/")
    ensure = _DATASETS.get(data_name)
    if ensure is not None and not file_name:
        return str(Path(ensure()["train"]).parent)
    if ensure is not None and file_name in DATA_FILES:
        return ensure()[file_name.removesuffix(".parquet")]
    valid = ", ".join(DEMO_PREFIX + n for n in _valid_names())
    raise DemoAssetError(f"unknown demo path {path!r}; valid demo paths are: {valid}")
