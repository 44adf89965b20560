"""Tensor parallel against one process: time per decode step and end to end, same pairs, same judgements.

    python benchmarks/tensor_parallel.py                       # CPU: 1 process vs torchrun 2 processes (gloo)
    python benchmarks/tensor_parallel.py --shape 14b --layers 12 --gpu   # 2 GPUs: device map vs tensor parallel

Random weights with the real Qwen2.5 tokenizer, every pair planted to reason ``--reasoning`` tokens (so
every variant runs the same steps), judged by the continuous engine. Variants:

- CPU: one process with torch's default threads (what a user runs), one process with 1 thread, and
  ``torchrun --nproc-per-node 2`` with ``--tensor-parallel`` (1 thread per process, torchrun's default);
- GPU (``--gpu``, 2 cards): the model split by a device map ("balanced": half the layers per card) and
  tensor parallel over the same 2 cards (nccl).

A CPU is not where tensor parallel pays: the two processes share the same cores and every layer adds two
all-reduces over loopback, and the gathered logits (rows x vocabulary) cross between the processes every
step. Prints one JSON line per variant, then the ratios measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

SHAPES = {  # hidden, layers, heads, kv heads, intermediate
    "small": (512, 4, 8, 4, 1024),
    "14b": (5120, 48, 40, 8, 13824),  # Qwen2.5-14B / rank1-14b
}
PASSAGE = "Bread rises because yeast ferments sugar in the dough and releases carbon dioxide gas. " * 3


def build(folder: Path, shape: str, layers: int | None, gpu: bool) -> None:
    """A random-weight Qwen2 of ``shape`` with the real tokenizer, saved (bfloat16 on GPU)."""
    import torch

    from rank1_hf import testing

    hidden, n_layers, heads, kv_heads, inter = SHAPES[shape]
    tok = testing.qwen_tokenizer()
    with torch.device("cuda" if gpu else "cpu"):
        model = testing.tiny_model(tok, hidden=hidden, layers=layers or n_layers, heads=heads, kv_heads=kv_heads,
                                   intermediate=inter, initializer_range=0.02 if shape == "14b" else 0.5)
    if gpu:
        model = model.to(torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def pairs_for(tok, n: int) -> list[tuple[str, str]]:
    from rank1_hf.testing import same_length_pairs

    return same_length_pairs(tok, n, PASSAGE)


def judge(folder: str, args, load: dict) -> dict | None:
    """Judge the pairs once to warm up, then timed; the leader's figures (None on a follower)."""
    import torch

    from plant import plant_lengths

    from rank1_hf import Rank1
    from rank1_hf.engine.runner import ModelRunner
    from rank1_hf.prompt import build_prompt

    ranker = Rank1(folder, max_new_tokens=args.reasoning + 8, batch_size=args.pairs, engine="continuous", **load)
    pairs = pairs_for(ranker.tokenizer, args.pairs)
    length = len(ranker.tokenizer(build_prompt(*pairs[0]))["input_ids"])
    plant_lengths(ranker.model, ranker.tokenizer, {length: args.reasoning})
    decode, spent = ModelRunner.decode, []

    def timed(self, last, cached):
        began = time.perf_counter()
        out = decode(self, last, cached)  # returns host lists: the step is finished
        spent.append(time.perf_counter() - began)
        return out

    ModelRunner.decode = timed
    if ranker.is_follower:
        ranker.follow()
        return None
    with ranker:
        ranker.judge(pairs[: max(2, args.pairs // 4)])  # warm-up: allocations, the pool, first-call costs
        spent.clear()
        began = time.perf_counter()
        judged = ranker.judge_with_stats(pairs)
        wall = time.perf_counter() - began
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return {"pairs": len(pairs), "steps": len(spent), "ms_per_step": 1e3 * sum(spent) / max(1, len(spent)),
            "end_to_end_s": wall, "threads": torch.get_num_threads(),
            "judgements": [[j.outcome, j.reasoning_tokens, j.score] for j in judged.judgements]}


def worker(args) -> None:
    """Under torchrun: one tensor-parallel process."""
    result = judge(args.model_dir, args, {"tensor_parallel": True})
    if result is not None:
        Path(args.out).write_text(json.dumps(result))


def torchrun(args, folder: Path, out: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(port), __file__, "--worker", "--model-dir", str(folder), "--out", str(out),
               "--pairs", str(args.pairs), "--reasoning", str(args.reasoning)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    subprocess.run(command, env=env, check=True, timeout=args.timeout)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--layers", type=int, help="fewer layers than the shape's (the per-layer cost is what differs)")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--reasoning", type=int, default=32, help="planted reasoning tokens per pair")
    ap.add_argument("--gpu", action="store_true", help="2 GPUs: device map vs tensor parallel")
    ap.add_argument("--timeout", type=float, default=900, help="seconds for the torchrun job")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    import torch

    if args.gpu and torch.cuda.device_count() < 2:
        print(json.dumps({"skipped": f"{torch.cuda.device_count()} GPU(s): tensor parallel needs 2"}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        build(folder, args.shape, args.layers, args.gpu)
        results = {}
        if args.gpu:
            results["device map, 2 cards"] = judge(str(folder), args, {"device_map": "balanced"})
        else:
            results[f"1 process, {torch.get_num_threads()} threads"] = judge(str(folder), args, {})
            default = torch.get_num_threads()
            torch.set_num_threads(1)
            results["1 process, 1 thread"] = judge(str(folder), args, {})
            torch.set_num_threads(default)
        name = "tensor parallel, 2 cards" if args.gpu else "tensor parallel, 2 processes x 1 thread"
        results[name] = torchrun(args, folder, Path(tmp) / "tp.json")
    base_name = next(iter(results))
    base = results[base_name]
    for name, r in results.items():
        diff = max(abs(a[2] - b[2]) for a, b in zip(r["judgements"], base["judgements"]))
        same = [a[:2] for a in r["judgements"]] == [b[:2] for b in base["judgements"]]
        print(json.dumps({"variant": name, "pairs": r["pairs"], "decode_steps": r["steps"],
                          "ms_per_step": round(r["ms_per_step"], 2), "end_to_end_s": round(r["end_to_end_s"], 2),
                          "same_outcomes_and_lengths": same, "max_score_diff": diff}), flush=True)
    parallel = list(results)[-1]
    for name, r in results.items():
        if name != parallel:
            t = results[parallel]
            print(f"{parallel} vs {name}: {r['ms_per_step'] / t['ms_per_step']:.2f}x per step, "
                  f"{r['end_to_end_s'] / t['end_to_end_s']:.2f}x end to end (above 1: tensor parallel is faster)")


if __name__ == "__main__":
    main()
