"""Agreement of batched judge() with the independent slow reference (tests/reference.py), per family.

    python benchmarks/agreement.py [--pairs 10] [--max-new-tokens 40]

For each family (tiny random model + its real tokenizer, planted to close </think> at varied steps) and
each engine and batch size, prints pairs compared, outcome and reasoning mismatches, and the largest
|score difference| against the reference (one pair at a time, no KV cache, float32 argmax loop).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import FAMILIES, PLANT_FACTOR, make_pairs  # noqa: E402
from plant import plant_think  # noqa: E402
from reference import reference_judge  # noqa: E402

from rank1_hf import Rank1  # noqa: E402
from rank1_hf.testing import tiny_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    args = ap.parse_args()
    print("| family | </think> tokens | engine | batch | pairs | outcomes (a/f) | outcome mismatches | reasoning mismatches | max abs score diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for family, (build, arch) in FAMILIES.items():
        tok = build()
        model = tiny_model(tok, arch, seed=0)
        plant_think(model, tok, PLANT_FACTOR[family])
        eos = {i for i in {tok.eos_token_id, model.generation_config.eos_token_id} if i is not None}
        pairs = make_pairs(args.pairs, seed=1)
        refs = [reference_judge(model, tok, q, p, args.max_new_tokens, eos) for q, p in pairs]
        answered = sum(r.outcome == "answered" for r in refs)
        n_think = len(tok.encode("</think>", add_special_tokens=False))
        for engine in ("generate", "continuous"):
            for batch in (1, 3, 16):
                js = Rank1.from_model(model, tok, max_new_tokens=args.max_new_tokens, engine=engine, batch_size=batch).judge(pairs)
                outcome = sum(j.outcome != r.outcome for j, r in zip(js, refs))
                reasoning = sum(j.reasoning != r.reasoning for j, r in zip(js, refs))
                diff = max(abs(j.score - r.score) for j, r in zip(js, refs))
                print(f"| {family} | {n_think} | {engine} | {batch} | {len(pairs)} | {answered}/{len(refs) - answered} | "
                      f"{outcome} | {reasoning} | {diff:.1e} |")


if __name__ == "__main__":
    main()
