"""Weight sync through the Ray object store: torch tensors as Ray pickles them, against
rlflow's raw-buffer transport (``rlflow.distributed.state_transport``).

One state dict (``full_model_state``, as ``PolicyWorker.publish_weights`` puts it: tied
weights are one tensor under two names) is put by one Ray worker and read by another, as
``publish_weights`` and a rollout worker's ``update_weights`` do, in one local cluster. Two models: the demo model, and SmolLM2-135M-Instruct (``make real-parts``) in
float32 and in bfloat16. For each, the median of ``--repeats`` puts and reads:

* ``torch``: ``ray.put(state)`` / ``ray.get(ref)``, the tensors pickled by torch;
* ``rlflow``: ``put_state(state)`` / ``get_state(ref)``.

    python benchmarks/weight_sync.py               # the numbers in docs/benchmarks.md
    python benchmarks/weight_sync.py --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _models() -> list[tuple[str, str, str]]:
    from rlflow.config.compose import compose_config
    from rlflow.demo.assets import resolve_demo_path
    from tools.real_parts import ensure

    demo = resolve_demo_path(compose_config("grpo").model.path)
    real = str(ensure("smollm2-135m-instruct"))
    return [("demo", demo, "float32"), ("smollm2-135m", real, "float32"), ("smollm2-135m", real, "bfloat16")]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    import ray

    from rlflow.distributed.ray_cluster import init_ray

    init_ray(num_cpus=2)

    @ray.remote(num_cpus=1)
    class Side:
        """Loads the model once; puts its state dict, or reads one, and times it."""

        def load(self, path: str, dtype: str) -> int:
            import torch
            from transformers import AutoModelForCausalLM

            from rlflow.workers.checkpointing import full_model_state

            model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
            self.state = full_model_state(model)  # what publish_weights puts: tied weights once
            storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self.state.values()}
            return sum(storages.values())

        def put(self, kind: str) -> tuple[list, float]:
            from rlflow.distributed.state_transport import put_state

            start = time.perf_counter()
            ref = ray.put(self.state) if kind == "torch" else put_state(self.state)
            return [ref], time.perf_counter() - start

        def read(self, refs: list, kind: str) -> float:
            from rlflow.distributed.state_transport import get_state

            start = time.perf_counter()
            state = ray.get(refs[0]) if kind == "torch" else get_state(refs[0])
            took = time.perf_counter() - start
            assert len(state) > 0
            return took

    sender, receiver = Side.remote(), Side.remote()
    print(f"{'model':<14} {'dtype':<9} {'MB':>6} {'transport':<9} {'put ms':>8} {'read ms':>8} {'total ms':>9}")
    for name, path, dtype in _models():
        size = ray.get(sender.load.remote(path, dtype))
        for kind in ("torch", "rlflow"):
            puts, reads = [], []
            for _ in range(args.repeats + 1):  # the first round warms up
                refs, put_s = ray.get(sender.put.remote(kind))
                reads.append(ray.get(receiver.read.remote(refs, kind)))
                puts.append(put_s)
                del refs
            put_ms, read_ms = 1e3 * statistics.median(puts[1:]), 1e3 * statistics.median(reads[1:])
            print(f"{name:<14} {dtype:<9} {size / 1e6:>6.1f} {kind:<9} {put_ms:>8.1f} {read_ms:>8.1f} "
                  f"{put_ms + read_ms:>9.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
