"""Where a decode step's time goes on a GPU, per engine: torch.profiler over one planted judge call.

    python benchmarks/gpu_profile.py [--shape 7b|tiny] [--batch 1] [--steps 32]

Prints, for each engine, wall ms per step and the top ops by self CUDA time and by self CPU time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_throughput import SHAPES, sync  # noqa: E402
from plant import plant_lengths  # noqa: E402

from rank1_hf import Rank1  # noqa: E402
from rank1_hf.testing import qwen_tokenizer, same_length_pairs, tiny_model  # noqa: E402
from rank1_hf.prompt import build_prompt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tok = qwen_tokenizer()
    with torch.device(device):
        model = tiny_model(tok, "qwen2", initializer_range=0.02, **SHAPES[args.shape]).to(dtype=dtype)
    # one prompt length, so every row gets the planted length; distinct, as identical pairs are judged once
    pairs = same_length_pairs(tok, args.batch, "passage " * 40)
    n = len(tok(build_prompt(*pairs[0]))["input_ids"])
    handle = plant_lengths(model, tok, {n: args.steps})
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for engine in ("generate", "continuous"):
        ranker = Rank1.from_model(model, tok, max_new_tokens=args.steps + 8, batch_size=args.batch, engine=engine)
        ranker.judge(pairs)  # warm-up
        sync()
        start = time.perf_counter()
        ranker.judge(pairs)
        sync()
        print(f"\n### {engine}: {1000 * (time.perf_counter() - start) / args.steps:.2f} ms per step (wall, unprofiled)")
        with profile(activities=activities) as prof:
            ranker.judge(pairs)
            sync()
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60))
    handle.remove()


if __name__ == "__main__":
    main()
