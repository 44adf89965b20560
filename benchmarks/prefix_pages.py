"""Shared prompt pages against every row prefilling its whole prompt, in ONE run on the same pairs.

    python benchmarks/prefix_pages.py              # tiny random Qwen2 (4 layers, hidden 256) + real Qwen2.5 tokenizer
    python benchmarks/prefix_pages.py --query-words 300 --passages 100 --length-scale 0.25

The reranking shape: 100 passages for each of 3 queries of about 300 tokens (BRIGHT-style), passages of
20-120 words, planted reasoning lengths (benchmarks/throughput.py's heavy-tailed ones, scaled). With
sharing, a row whose prompt starts with full pages another row in the pool holds reads them by reference:
it prefills only the rest (about its passage) and holds only its own pages. Both settings get the same
KV memory, at two sizes: "ample" (every row fits: the prefill saving alone) and "tight" (8 worst-case
rows: how many rows sharing fits in flight).

Printed per pool and setting: seconds, prefill tokens run (padding included) and served from shared
pages, decode steps, peak and mean rows in flight, preemptions, and whether the judgements equal the
unshared ones (same reasoning; largest score difference); then the ratios shared / unshared. Ratios are
measured in one run (``--repeat N`` alternates the settings N times and keeps each one's fastest);
absolute numbers on this noisy shared CPU are not comparable across runs.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from plant import plant_lengths  # noqa: E402
from throughput import WORDS, lengths_for  # noqa: E402

from rank1_hf import Rank1, judging  # noqa: E402
from rank1_hf.engine.continuous import ContinuousEngine  # noqa: E402
from rank1_hf.model.kv_budget import kv_bytes_per_token  # noqa: E402
from rank1_hf.prompt import build_prompt  # noqa: E402
from rank1_hf.testing import qwen_tokenizer, tiny_model  # noqa: E402


class UnsharedEngine(ContinuousEngine):
    """The engine with every row prefilling its whole prompt (the baseline)."""

    def __init__(self, model, settings):
        super().__init__(model, settings, share_prompts=False)


def judge(model, tok, pairs, max_new: int, kv_memory: int, shared: bool):
    judging.ContinuousEngine = ContinuousEngine if shared else UnsharedEngine
    try:
        with Rank1.from_model(model, tok, max_new_tokens=max_new, batch_size=64, engine="continuous",
                              kv_memory=kv_memory) as ranker:
            start = time.perf_counter()
            judged = ranker.judge_with_stats(pairs)
            return judged, time.perf_counter() - start
    finally:
        judging.ContinuousEngine = ContinuousEngine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passages", type=int, default=100, help="passages per query (3 queries)")
    ap.add_argument("--query-words", type=int, default=300)
    ap.add_argument("--length-scale", type=float, default=0.25, help="planted reasoning lengths x this")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pools", nargs="*", default=["ample", "tight"], choices=["ample", "tight"])
    ap.add_argument("--repeat", type=int, default=1, help="runs per setting, alternating; the fastest is printed")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = qwen_tokenizer()
    model = tiny_model(tok, "qwen2", seed=0, layers=4, hidden=256, heads=8, kv_heads=2, intermediate=512,
                       initializer_range=0.02)
    rng = random.Random(0)
    queries = [" ".join(rng.choices(WORDS, k=args.query_words)) for _ in range(3)]
    pairs = [(q, " ".join(rng.choices(WORDS, k=rng.randint(20, 120)))) for q in queries for _ in range(args.passages)]
    prompt_lens = sorted({len(tok(build_prompt(q, p))["input_ids"]) for q, p in pairs})
    planted = dict(zip(prompt_lens, lengths_for(len(prompt_lens), rng, args.length_scale)))
    max_new = max(planted.values()) + 16
    query_tokens = [len(tok(q, add_special_tokens=False)["input_ids"]) for q in queries]
    print(f"{len(pairs)} pairs: queries of {query_tokens} tokens, prompts of {prompt_lens[0]}-{prompt_lens[-1]} "
          f"tokens, reasoning {min(planted.values())}-{max(planted.values())} tokens")
    per_token = kv_bytes_per_token(model)
    worst = prompt_lens[-1] + max_new + 64  # one worst-case row (64: the closing margin)
    handle = plant_lengths(model, tok, planted)
    print("| pool | setting | s | prefill tokens run | prefill tokens shared | decode steps | peak rows | "
          "mean rows | preemptions | same reasoning | max score diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    try:
        for pool, rows in (("ample", 64), ("tight", 8)):
            if pool not in args.pools:
                continue
            memory = rows * worst * per_token
            runs = {}
            for _ in range(args.repeat):  # alternating, so a slow spell of this shared machine hits both
                for shared in (False, True):
                    run = judge(model, tok, pairs, max_new, memory, shared)
                    if shared not in runs or run[1] < runs[shared][1]:
                        runs[shared] = run
            base = runs[False][0]
            for shared in (False, True):
                judged, seconds = runs[shared]
                st = judged.stats
                same = sum(a.reasoning == b.reasoning for a, b in zip(judged.judgements, base.judgements))
                diff = max(abs(a.score - b.score) for a, b in zip(judged.judgements, base.judgements))
                print(f"| {pool} ({rows} worst-case rows) | {'shared' if shared else 'unshared'} | {seconds:.1f} | "
                      f"{st.prefill_tokens} | {st.prefill_tokens_shared} | {st.steps} | {st.peak_rows} | "
                      f"{st.decode_slots / max(1, st.steps):.1f} | {st.preemptions} | {same}/{len(pairs)} | {diff:.1e} |")
            (a, a_s), (b, b_s) = runs[True], runs[False]
            print(f"| {pool} | shared / unshared | {a_s / b_s:.2f}x time | "
                  f"{a.stats.prefill_tokens / b.stats.prefill_tokens:.2f}x | | "
                  f"{a.stats.steps / b.stats.steps:.2f}x steps | | "
                  f"{(a.stats.decode_slots / a.stats.steps) / (b.stats.decode_slots / b.stats.steps):.2f}x | | | |")
            sys.stdout.flush()
    finally:
        handle.remove()


if __name__ == "__main__":
    main()
