"""Ray Data against one process on the same pairs, in ONE run: what Ray costs at start and per pair.

    python benchmarks/ray_batch.py                     # 32 and 96 pairs, tiny random Qwen2 (4 layers, hidden 256)
    python benchmarks/ray_batch.py --pairs 64 --max-new-tokens 64

Two jobs, N and 3N pairs (through :func:`rank1_hf.pipeline.judge_items`, a fresh store each time), three
ways; the difference between the two jobs, per extra pair, is the cost per pair with fixed costs cancelled:

1. one process: ``Rank1`` on torch's default threads (what ``rank1-hf rerank`` does); model load timed apart;
2. Ray, 1 actor with 2 CPUs: the pure overhead of going through Ray Data (same compute as 1.);
3. Ray, 2 actors with 1 CPU each (``--threads 1``): the pool as it would spread over GPUs.

Printed: Ray's start-up (``ray.init`` of a local cluster), the probe (one ranker loaded in a Ray task for
the store key), each job's wall time and time to the first batch back, a job's fixed cost (the actors'
start-up: each job makes its pool), the cost per pair against the one process's, and whether every
judgement agrees with the one process (same reasoning, scores within 1e-4). On a 2-core machine the pool
cannot be faster than one process; the numbers to read are the fixed costs and the per-pair overhead.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rank1_hf import pipeline  # noqa: E402
from rank1_hf.options import JudgeOptions  # noqa: E402
from rank1_hf.io.store import JudgementStore  # noqa: E402
from rank1_hf.testing import qwen_tokenizer, tiny_model  # noqa: E402

WORDS = ("cat dog bread oven yeast river mountain law court judge software python compiler vitamin protein "
         "football goal rain cloud engine battery museum painting").split()


def make_items(n: int) -> list[pipeline.Item]:
    rng = random.Random(0)
    queries = {f"q{i}": " ".join(rng.choices(WORDS, k=rng.randint(2, 6))) for i in range(max(1, n // 8))}
    corpus = {f"d{i}": " ".join(rng.choices(WORDS, k=rng.randint(10, 80))) for i in range(n)}
    run = {}
    for i in range(n):
        run.setdefault(f"q{i % len(queries)}", []).append((f"d{i}", float(n - i)))
    return pipeline.build_items(run, queries, corpus)


def job(ranker, items, folder: Path, name: str) -> tuple[float, float, dict]:
    """(wall s, s to the first judgement back, judgements)."""
    started, first = time.perf_counter(), []

    def progress(n: int) -> None:
        if not first:
            first.append(time.perf_counter() - started)

    with JudgementStore(folder / f"{name}.sqlite") as store:
        result = pipeline.judge_items(ranker, items, store, shard=pipeline.Shard(), progress=progress)
    return time.perf_counter() - started, first[0], result.judgements


def agreement(a: dict, b: dict) -> str:
    same = all(a[k].reasoning == b[k].reasoning for k in a) and a.keys() == b.keys()
    worst = max(abs(a[k].score - b[k].score) for k in a)
    return f"{'same reasoning' if same else 'REASONING DIFFERS'}, largest score difference {worst:.1e}" + \
        ("" if same and worst <= 1e-4 else "  <-- MISMATCH")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=32, help="the small job; the large one has 3x as many")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    import ray

    from rank1_hf.ranker import Rank1
    from rank1_hf.scale.ray_batch import RayRanker

    folder = Path(tempfile.mkdtemp(prefix="ray-batch-"))
    model_dir = folder / "model"
    tok = qwen_tokenizer()
    tiny_model(tok, layers=4, hidden=256, heads=4, kv_heads=2, intermediate=512).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    small, large = make_items(args.pairs), make_items(3 * args.pairs)
    options = JudgeOptions(max_new_tokens=args.max_new_tokens, context_size=1024, batch_size=args.batch_size)
    print(f"jobs of {len(small)} and {len(large)} pairs, max_new_tokens {args.max_new_tokens}, batch size "
          f"{args.batch_size}; model: tiny Qwen2 (4 layers, hidden 256) + real Qwen2.5 tokenizer")

    def marginal(t_small: float, t_large: float) -> float:
        """ms per pair once started: the large job's extra time over its extra pairs (fixed costs cancel)."""
        return (t_large - t_small) / (len(large) - len(small)) * 1000

    t = time.perf_counter()
    local = Rank1(str(model_dir), judge=options)
    load_s = time.perf_counter() - t
    one_small, _, _ = job(local, small, folder, "one-small")
    one_large, _, one = job(local, large, folder, "one-large")
    local.close()
    one_ms = marginal(one_small, one_large)
    print(f"one process: load {load_s:.1f} s; jobs {one_small:.1f} s and {one_large:.1f} s: {one_ms:.0f} ms/pair")

    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    print(f"ray.init (local cluster, 2 CPUs): {time.perf_counter() - t:.1f} s")
    try:
        for actors, cpus, threads in ((1, 2.0, None), (2, 1.0, 1)):
            t = time.perf_counter()
            ranker = RayRanker(str(model_dir), judge=options, actors=actors, cpus_per_actor=cpus, threads=threads)
            probe_s = time.perf_counter() - t
            ray_small, first_s, _ = job(ranker, small, folder, f"ray{actors}-small")
            ray_large, _, judged = job(ranker, large, folder, f"ray{actors}-large")
            ray_ms = marginal(ray_small, ray_large)
            print(f"Ray Data, {actors} actor(s) x {cpus:g} CPU: probe {probe_s:.1f} s; jobs {ray_small:.1f} s and "
                  f"{ray_large:.1f} s (first batch back after {first_s:.1f} s); fixed cost of a job "
                  f"{ray_small - len(small) * ray_ms / 1000:.1f} s; {ray_ms:.0f} ms/pair ({ray_ms - one_ms:+.0f} "
                  f"against one process); large job: {agreement(one, judged)}")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
