"""Rows in flight bounded by the keys and values they hold, against rows that reserve the worst case, in ONE run.

    python benchmarks/kv_pool.py                 # tiny random Qwen2 (4 layers, hidden 256) + real Qwen2.5 tokenizer
    python benchmarks/kv_pool.py --pairs 64 --length-scale 0.25 --page-sizes 16 32 64

Both settings get the same KV memory: that of 8 worst-case rows, 8 x (longest prompt + max_new_tokens)
tokens. "reserve-at-max" is what the engine did before the paged pool: at most 8 rows (batch_size=8), so
no row can ever run out. "paged" lets up to 64 rows in and gives them pages as they grow, preempting the
newest row when the pool is full. Workloads (benchmarks/throughput.py, reasoning lengths scaled):

1. "answered": heavy-tailed planted reasoning lengths, every pair closes </think>;
2. "runaway": the same plus one prompt length in 32 that never closes and runs to max_new_tokens.

Printed per workload and setting: seconds, decode steps, peak rows, preemptions, and whether the paged
judgements equal the reserve-at-max ones (same reasoning; largest score difference). Goal (issue 23):
paged keeps >= 16 rows in flight and needs <= 0.6x the decode steps.

Then the page size: ms per decode step of the paged cache at 32 rows for each candidate page size (the
gather that reads a row's pages is the cost that grows with smaller pages' index work). Ratios are
measured in one run; absolute numbers on this noisy shared CPU are not comparable across runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from plant import plant_lengths  # noqa: E402
from throughput import workload  # noqa: E402

from rank1_hf import Rank1  # noqa: E402
from rank1_hf.engine import runner as runner_module  # noqa: E402
from rank1_hf.model.kv_budget import kv_bytes_per_token  # noqa: E402
from rank1_hf.prompt import build_prompt  # noqa: E402
from rank1_hf.testing import qwen_tokenizer, same_length_pairs, tiny_model  # noqa: E402


def judge(model, tok, pairs, max_new: int, batch: int, kv_memory: int):
    with Rank1.from_model(model, tok, max_new_tokens=max_new, batch_size=batch, engine="continuous",
                          kv_memory=kv_memory) as ranker:
        start = time.perf_counter()
        judged = ranker.judge_with_stats(pairs)
        return judged, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--length-scale", type=float, default=0.25, help="planted reasoning lengths x this")
    ap.add_argument("--page-sizes", type=int, nargs="*", default=[16, 32, 64])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = qwen_tokenizer()
    model = tiny_model(tok, "qwen2", seed=0, layers=4, hidden=256, heads=8, kv_heads=2, intermediate=512,
                       initializer_range=0.02)
    per_token = kv_bytes_per_token(model)
    print("| workload | setting | s | decode steps | peak rows | preemptions | same reasoning | max score diff |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, name in ((1, "answered"), (2, "runaway")):
        pairs, planted, never = workload(kind, tok, args.pairs, scale=args.length_scale)
        max_new = max(planted.values()) + 16
        longest = max(len(tok(build_prompt(q, p))["input_ids"]) for q, p in pairs)
        memory = 8 * (longest + max_new + 64) * per_token  # 8 worst-case rows (64: the closing margin)
        handle = plant_lengths(model, tok, planted, never)
        reserved, reserved_s = judge(model, tok, pairs, max_new, 8, memory)
        paged, paged_s = judge(model, tok, pairs, max_new, 64, memory)
        handle.remove()
        same = sum(a.reasoning == b.reasoning for a, b in zip(paged.judgements, reserved.judgements))
        diff = max(abs(a.score - b.score) for a, b in zip(paged.judgements, reserved.judgements))
        for label, judged, seconds in (("reserve-at-max (8 rows)", reserved, reserved_s), ("paged (<= 64 rows)", paged, paged_s)):
            st = judged.stats
            print(f"| {name} | {label} | {seconds:.1f} | {st.steps} | {st.peak_rows} | {st.preemptions} | "
                  f"{same}/{len(pairs)} | {diff:.1e} |")
        print(f"| {name} | paged / reserve-at-max | {paged_s / reserved_s:.2f}x time | "
              f"{paged.stats.steps / reserved.stats.steps:.2f}x steps | | | | |")
        sys.stdout.flush()

    print("\n| page size | ms per decode step (32 rows, ~300 tokens each) |")
    print("|---|---|")
    pairs = same_length_pairs(tok, 32, "passage " * 200)
    n = len(tok(build_prompt(*pairs[0]))["input_ids"])
    handle = plant_lengths(model, tok, {n: 64})
    saved = runner_module.PAGE_SIZE
    for size in args.page_sizes:
        runner_module.PAGE_SIZE = size
        times = []
        for length in (1, 64):
            handle.remove()
            handle = plant_lengths(model, tok, {n: length})
            judged, seconds = judge(model, tok, pairs, 80, 32, 2**30)
            times.append(seconds)
        print(f"| {size} | {1000 * (times[1] - times[0]) / 63:.1f} |")
        sys.stdout.flush()
    runner_module.PAGE_SIZE = saved
    handle.remove()


if __name__ == "__main__":
    main()
