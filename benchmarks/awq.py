"""AWQ (rank1_hf.model.awq, torch's int4 kernel) against the float model, on CPU, in ONE run.

    python benchmarks/awq.py                      # a random Qwen2 with 1024-wide layers, real Qwen2.5 tokenizer
    python benchmarks/awq.py --layers 4 --pairs 4 # quicker
    python benchmarks/awq.py --threads 1          # see --help

The AWQ checkpoint is packed by hand (tests/awq_fixture.py) and the float checkpoint is its dequantized
float32 twin, so both hold the same weights. Each variant loads the way a user's would (load_model's
defaults: float32 on CPU for the float model, bfloat16 for AWQ) and reports: weight bytes held, peak
RSS over load + run, ms per decode step (one new token against a short cache) at batch 1 and 16, and
rank1 pairs/s at batch 1 (Rank1.judge, short reasoning cap). Ratios are measured in one run; absolute
figures on a shared 2-core machine are not comparable across runs.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from awq_fixture import build_awq_checkpoint, save_float_checkpoint  # noqa: E402

from rank1_hf.comparison import PeakMemory  # noqa: E402
from rank1_hf.model.loading import load_model  # noqa: E402

WORDS = "cat dog bread oven yeast river mountain law court judge software python compiler vitamin protein".split()


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@torch.no_grad()
def decode_step_ms(model, batch_size: int, steps: int, context: int = 32) -> float:
    """Median ms of one decode step (one token per row) after a ``context``-token prefill."""
    ids = torch.randint(100, 1000, (batch_size, context))
    out = model(input_ids=ids, use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        times.append(time.perf_counter() - start)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return 1000 * statistics.median(times)


def pairs_per_s(model, tokenizer, pairs, max_new_tokens: int) -> float:
    from rank1_hf.ranker import Rank1

    ranker = Rank1.from_model(model, copy.deepcopy(tokenizer), max_new_tokens=max_new_tokens, batch_size=1,
                              show_progress_bar=False)
    start = time.perf_counter()
    ranker.judge(pairs)
    return len(pairs) / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8, help="decode steps timed per batch size")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (on a loaded machine the int4 kernel's threads wait for each other)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from rank1_hf.testing import qwen_tokenizer

    tokenizer = copy.deepcopy(qwen_tokenizer())
    shape = dict(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                 num_attention_heads=args.hidden // 128, num_key_value_heads=2)
    import random

    rng = random.Random(0)
    pairs = [(" ".join(rng.choices(WORDS, k=4)), " ".join(rng.choices(WORDS, k=rng.randint(20, 60))))
             for _ in range(args.pairs)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model: {args.layers} layers, hidden "
          f"{args.hidden}, intermediate {args.intermediate}, vocab {len(tokenizer)} (tied head, not quantized)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        twin = build_awq_checkpoint(tokenizer, root / "awq", seed=0, **shape)
        save_float_checkpoint(twin, tokenizer, root / "float")
        del twin
        rows = []
        for label, path in (("float (float32)", root / "float"), ("AWQ int4 (bfloat16)", root / "awq")):
            with PeakMemory() as peak:
                model, tok = load_model(str(path))
                row = {"variant": label, "dtype": str(model.dtype).removeprefix("torch."), "weights": weight_bytes(model)}
                for b in (1, 16):
                    row[f"ms/step b{b}"] = decode_step_ms(model, b, args.steps)
                row["pairs/s b1"] = pairs_per_s(model, tok, pairs, args.max_new_tokens)
            row["peak RSS"] = peak.rss_delta_bytes or 0
            rows.append(row)
            print(f"  {row}", flush=True)
            del model
    float_row, awq_row = rows
    print("\n| variant | weights MB | peak RSS MB | ms/step b1 | ms/step b16 | pairs/s b1 |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['weights'] / 1e6:.0f} | {r['peak RSS'] / 1e6:.0f} | {r['ms/step b1']:.1f} | "
              f"{r['ms/step b16']:.1f} | {r['pairs/s b1']:.2f} |")
    print(f"\nAWQ / float: weights {awq_row['weights'] / float_row['weights']:.2f}x, "
          f"step b1 {awq_row['ms/step b1'] / float_row['ms/step b1']:.2f}x, "
          f"step b16 {awq_row['ms/step b16'] / float_row['ms/step b16']:.2f}x, "
          f"pairs/s b1 {awq_row['pairs/s b1'] / float_row['pairs/s b1']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
