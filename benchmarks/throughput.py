"""Throughput of the rank1-hf engines against the two usual baselines, in ONE run on the same pairs.

    python benchmarks/throughput.py                   # tiny random Qwen2 + real Qwen2.5 tokenizer
    python benchmarks/throughput.py --model smollm2   # real SmolLM2-135M weights
    python benchmarks/throughput.py --model both --workloads 1,2,3

Reasoning lengths are planted (tests/plant.py: the model is steered to write r countdown tokens, then
</think>) so that every engine does the full real compute on a rank1-like length distribution:

1. heavy-tailed lengths, median about 250, from 30 to 1000;
2. the same, plus one pair in 32 that never closes </think> and runs to max_new_tokens;
3. 100 passages for each of 3 queries (the reranking shape).

Engines: "one-at-a-time" (generate per pair, then a full forward pass for the readout: what existing
transformers ports of rank1 do), "static" (rank1-hf's GenerateEngine: batched model.generate), and
"continuous" (rank1-hf's ContinuousEngine). Printed per engine: pairs/s, generated tokens/s, decode-slot
efficiency (reasoning tokens / rows x decode steps computed), readout cost (tokens run only for the
readout / all tokens run), peak memory over the run, and speed-ups against the baselines. Ratios are
measured in one run, on one machine state; absolute numbers on this noisy 2-core machine are not.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from plant import plant_lengths  # noqa: E402

from rank1_hf import Rank1  # noqa: E402
from rank1_hf.comparison import PeakMemory  # noqa: E402
from rank1_hf.prompt import build_prompt  # noqa: E402
from rank1_hf.engine.readout import readout_ids, score  # noqa: E402

WORDS = "cat dog bread oven yeast river mountain law court judge software python compiler vitamin protein".split()


def lengths_for(n: int, rng: random.Random, scale: float = 1.0) -> list[int]:
    """Heavy-tailed reasoning lengths: lognormal with median 250, clipped to [30, 1000] (times ``scale``)."""
    return [max(1, int(scale * min(1000, max(30, round(250 * math.exp(rng.gauss(0, 0.7))))))) for _ in range(n)]


def workload(kind: int, tokenizer, n: int, seed: int = 0, scale: float = 1.0):
    """(pairs, planted lengths by prompt length, prompt lengths that never close)."""
    rng = random.Random(seed)
    if kind == 3:
        queries = ["how do cats digest bread", "python compiler for judges", "river mountain vitamin law"]
        pairs = [(q, " ".join(rng.choices(WORDS, k=rng.randint(20, 120)))) for q in queries for _ in range(100)]
    else:
        pairs = [(" ".join(rng.choices(WORDS, k=4)), " ".join(rng.choices(WORDS, k=rng.randint(20, 200)))) for _ in range(n)]
    prompt_lens = sorted({len(tokenizer(build_prompt(q, p))["input_ids"]) for q, p in pairs})
    planted = dict(zip(prompt_lens, lengths_for(len(prompt_lens), rng, scale)))
    never = set(rng.sample(prompt_lens, max(1, len(prompt_lens) // 32))) if kind == 2 else set()
    for n_tokens in never:
        planted.pop(n_tokens)
    return pairs, planted, never


@torch.inference_mode()
def one_at_a_time(model, tokenizer, pairs, max_new_tokens):
    """The usual port: generate per pair until </think>, then re-read everything for the readout."""
    t_id, f_id = readout_ids(tokenizer)
    stats = {"generated": 0, "slots": 0, "readout": 0, "all": 0}
    scores = []
    for q, p in pairs:
        ids = tokenizer(build_prompt(q, p), return_tensors="pt")["input_ids"]
        out = model.generate(
            ids, max_new_tokens=max_new_tokens, do_sample=False, stop_strings=["</think>"], tokenizer=tokenizer,
            pad_token_id=tokenizer.pad_token_id or 0,
        )
        gen = out.shape[1] - ids.shape[1]
        logits = model(out, logits_to_keep=1).logits[0, -1].float()
        scores.append(score(float(logits[t_id]), float(logits[f_id])))
        stats["generated"] += gen
        stats["slots"] += max(gen - 1, 0)
        stats["readout"] += out.shape[1]
        stats["all"] += ids.shape[1] + max(gen - 1, 0) + out.shape[1]
    return scores, stats


def run_engine(ranker: Rank1, pairs, engine: str):
    with Rank1.from_model(ranker.model, ranker.tokenizer, max_new_tokens=ranker.max_new_tokens,
                          context_size=ranker.context_size, batch_size=ranker.batch_size, engine=engine) as named:
        judged = named.judge_with_stats(pairs)
    judgements, s = judged.judgements, judged.stats
    return judgements, {
        "generated": s.generated_tokens,
        "slots": s.decode_slots,
        "readout": s.readout_tokens,
        "all": s.prefill_tokens + s.decode_slots + s.readout_tokens,
    }


def load(name: str):
    from rank1_hf.model.assets import smollm2
    from rank1_hf.testing import qwen_tokenizer, tiny_model

    if name == "tiny":
        tok = qwen_tokenizer()
        # A tiny model: 2 layers, hidden 64, the real 151k-token Qwen2.5 vocabulary.
        return tiny_model(tok, "qwen2", layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, initializer_range=0.02), tok
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2()
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path, padding_side="left")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", choices=["tiny", "smollm2", "both"])
    ap.add_argument("--workloads", default="1,2")
    ap.add_argument("--pairs", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=1200)
    ap.add_argument("--baseline-pairs", type=int, default=None, help="run one-at-a-time on the first N pairs only")
    ap.add_argument("--length-scale", type=float, default=1.0, help="scale the planted reasoning lengths (e.g. 0.25 for slow models)")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, {'cuda' if torch.cuda.is_available() else 'cpu'}")
    for name in (["tiny", "smollm2"] if args.model == "both" else [args.model]):
        model, tok = load(name)
        for kind in [int(k) for k in args.workloads.split(",")]:
            pairs, planted, never = workload(kind, tok, args.pairs, scale=args.length_scale)
            handle = plant_lengths(model, tok, planted, never)
            ranker = Rank1.from_model(model, tok, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
            rows = {}
            results = {}
            engines = ["continuous", "static"] + ([] if kind == 3 else ["one-at-a-time"])
            for engine in engines:
                subset = pairs[: args.baseline_pairs] if engine == "one-at-a-time" and args.baseline_pairs else pairs
                with PeakMemory(interval_s=0.005) as mem:
                    start = time.perf_counter()
                    if engine == "one-at-a-time":
                        out, stats = one_at_a_time(model, tok, subset, args.max_new_tokens)
                    else:
                        out, stats = run_engine(ranker, subset, "generate" if engine == "static" else engine)
                    elapsed = time.perf_counter() - start
                results[engine] = out
                rows[engine] = {
                    "pairs/s": len(subset) / elapsed,
                    "gen tok/s": stats["generated"] / elapsed,
                    "slot eff": stats["generated"] / max(stats["slots"], 1),
                    "readout cost": stats["readout"] / max(stats["all"], 1),
                    "peak MB": (mem.peak_bytes or 0) / 2**20,
                    "seconds": elapsed,
                    "pairs": len(subset),
                }
            handle.remove()
            a, b = results["continuous"], results["static"]
            same = sum(x.reasoning == y.reasoning and x.outcome == y.outcome for x, y in zip(a, b))
            diff = max(abs(x.score - y.score) for x, y in zip(a, b))
            reasoning = sorted(j.reasoning_tokens for j in a)
            print(f"\n## model={name} workload={kind} pairs={len(pairs)} max_new_tokens={args.max_new_tokens} "
                  f"batch={args.batch_size}")
            print(f"reasoning tokens: median {reasoning[len(reasoning) // 2]}, min {reasoning[0]}, max {reasoning[-1]}; "
                  f"outcomes {dict((o, sum(j.outcome == o for j in a)) for o in ('answered', 'forced', 'fallback'))}")
            print(f"continuous vs static: identical reasoning {same}/{len(a)}, max |score diff| {diff:.2e}")
            print("| engine | pairs | s | pairs/s | gen tok/s | slot eff | readout cost | peak MB | x static | x one-at-a-time |")
            print("|---|---|---|---|---|---|---|---|---|---|")
            for engine, r in rows.items():
                vs_static = r["pairs/s"] / rows["static"]["pairs/s"]
                vs_one = r["pairs/s"] / rows["one-at-a-time"]["pairs/s"] if "one-at-a-time" in rows else float("nan")
                print(f"| {engine} | {r['pairs']} | {r['seconds']:.1f} | {r['pairs/s']:.3f} | {r['gen tok/s']:.0f} | "
                      f"{r['slot eff']:.3f} | {r['readout cost']:.4f} | {r['peak MB']:.0f} | {vs_static:.2f} | {vs_one:.2f} |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
