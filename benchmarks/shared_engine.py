"""Many callers on one ranker, in ONE run: do concurrent callers share decode steps, and what does a call cost?

    python benchmarks/shared_engine.py                 # tiny random Qwen2 (4 layers, hidden 256) + real Qwen2.5 tokenizer
    python benchmarks/shared_engine.py --callers 8 --each 4 --small-calls 20

1. Concurrency: the same 32 pairs (planted reasoning lengths, benchmarks/throughput.py's workload 1 scaled
   down) judged as one call, then as 8 threads x 4 pairs started together on the same ranker. Printed:
   both times, their ratio (goal <= 1.3), peak rows in one step, and whether every thread's judgements
   equal the one call's (same reasoning; largest score difference).
2. Per-call overhead: 20 sequential calls of 2 pairs reasoning 2 tokens each, with the ranker's engine
   kept between calls (now) and with a new engine made for every call (what every call did before the
   shared engine: a second ranker closed after each call), alternating. Printed: ms per call each way
   and the ratio. On a CPU a new engine costs its cache allocation; on a GPU also every CUDA graph.

Ratios are measured in one run; absolute numbers on this noisy shared CPU are not comparable across runs.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from plant import plant_lengths  # noqa: E402
from throughput import workload  # noqa: E402

from rank1_hf import Rank1  # noqa: E402
from rank1_hf.testing import qwen_tokenizer, tiny_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--callers", type=int, default=8)
    ap.add_argument("--each", type=int, default=4)
    ap.add_argument("--small-calls", type=int, default=20)
    ap.add_argument("--length-scale", type=float, default=0.12, help="planted reasoning lengths x this")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = qwen_tokenizer()
    model = tiny_model(tok, "qwen2", seed=0, layers=4, hidden=256, heads=8, kv_heads=2, intermediate=512,
                       initializer_range=0.02)
    n = args.callers * args.each
    pairs, planted, never = workload(1, tok, n, scale=args.length_scale)
    handle = plant_lengths(model, tok, planted, never)
    max_new = max(planted.values()) + 8
    ranker = Rank1.from_model(model, tok, max_new_tokens=max_new, batch_size=n)
    ranker.judge(pairs[:2])  # warm-up: the engine and its cache are made here

    start = time.perf_counter()
    one = ranker.judge_with_stats(pairs)
    one_s = time.perf_counter() - start

    chunks = [pairs[k * args.each : (k + 1) * args.each] for k in range(args.callers)]
    got: list = [None] * args.callers
    gate = threading.Barrier(args.callers + 1)

    def caller(k: int) -> None:
        gate.wait()
        got[k] = ranker.judge_with_stats(chunks[k])

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(args.callers)]
    for t in threads:
        t.start()
    gate.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    threads_s = time.perf_counter() - start
    flat = [j for g in got for j in g.judgements]
    same = sum(a.reasoning == b.reasoning and a.outcome == b.outcome for a, b in zip(flat, one.judgements))
    diff = max(abs(a.score - b.score) for a, b in zip(flat, one.judgements))
    print(f"## {args.callers} threads x {args.each} pairs against one call of {n} pairs (same ranker, same pairs)\n")
    print("| run | s | peak rows in a step | decode steps |")
    print("|---|---|---|---|")
    print(f"| one call of {n} | {one_s:.2f} | {one.stats.peak_rows} | {one.stats.steps} |")
    print(f"| {args.callers} threads x {args.each} | {threads_s:.2f} | {max(g.stats.peak_rows for g in got)} "
          f"| {max(g.stats.steps for g in got)} |")
    print(f"\ntime ratio threads / one call: {threads_s / one_s:.2f} (goal <= 1.3); same reasoning and outcome: "
          f"{same}/{n}; largest score difference: {diff:.1e}")

    # Short reasoning (2 tokens) so that what a call costs besides decoding shows; kept and new calls
    # alternate, so drift in the machine's load hits both alike.
    handle.remove()
    handle = plant_lengths(model, tok, {n: 2 for n in planted}, never)
    small = [pairs[2 * k : 2 * k + 2] for k in range(args.small_calls)]
    fresh = Rank1.from_model(model, tok, max_new_tokens=max_new, batch_size=n)
    kept_s = fresh_s = 0.0
    agree = True
    ranker.judge(small[0])
    for c in small:
        start = time.perf_counter()
        kept = ranker.judge(c)
        kept_s += time.perf_counter() - start
        start = time.perf_counter()
        new = fresh.judge(c)
        fresh.close()  # the next call makes a new engine and cache, as every call did before
        fresh_s += time.perf_counter() - start
        agree = agree and [j.reasoning for j in kept] == [j.reasoning for j in new]
    print(f"\n## {args.small_calls} sequential calls of 2 pairs, 2 reasoning tokens each\n")
    print("| engine | ms per call |")
    print("|---|---|")
    print(f"| kept (shared, long-lived) | {1000 * kept_s / len(small):.1f} |")
    print(f"| new per call (before) | {1000 * fresh_s / len(small):.1f} |")
    print(f"\nper-call time ratio new / kept: {fresh_s / kept_s:.2f}; same reasoning: {agree}")
    handle.remove()
    ranker.close()


if __name__ == "__main__":
    main()
