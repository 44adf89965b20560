"""Decode-step cost and throughput on a lent GPU (issue 5's GPU part): a few minutes on one H100/H200.

    python benchmarks/gpu_throughput.py                 # 7B-shaped Qwen2, random weights, bfloat16
    python benchmarks/gpu_throughput.py --shape tiny    # a smoke run (CPU is fine)

Prints, as markdown to paste into benchmarks/RESULTS.md with the card's name and the date:
1. ms per decode step at batch 1, 16 and 64 for each engine, with the memory-bandwidth floor beside it
   (weight bytes / measured device-to-device copy bandwidth: a decode step must read every weight once);
2. with --long (rank1's real lengths: prompts of about 500 tokens, reasoning from 1,000 to 1,256 tokens):
   ms per decode step at batch 1, 16, 64 and 128, beside a floor that adds the key/value bytes each step
   must read (batch x tokens in the cache x bytes per token) to the weight bytes;
3. pairs/s of each engine on workload 1 of benchmarks/throughput.py (heavy-tailed planted lengths), and
   how many rows reason exactly as the eager continuous engine does (bfloat16: different GEMM shapes can
   flip near-ties), with the largest score difference.
Reasoning lengths are planted (tests/plant.py) so each step count is known in advance.

Engines: "generate" (model.generate), "continuous" (engine v2; on one GPU its decode steps are CUDA graphs,
rank1_hf/decode_step.py) and "continuous-eager" (the same engine with graphs turned off).

    python benchmarks/gpu_throughput.py --long --batches 1 16 64 128 --repeats 1 --skip-workload
    python benchmarks/gpu_throughput.py --pairs 64 --skip-steps
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from plant import plant_lengths  # noqa: E402
from throughput import workload  # noqa: E402

from rank1_hf import Rank1  # noqa: E402
from rank1_hf import runner as runner_module  # noqa: E402
from rank1_hf.testing import qwen_tokenizer, same_length_pairs, tiny_model  # noqa: E402
from rank1_hf.prompt import build_prompt  # noqa: E402

SHAPES = {
    "7b": dict(layers=28, hidden=3584, heads=28, kv_heads=4, intermediate=18944),
    "tiny": dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128),
}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync()
    start = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync()
    return 2 * 10 * x.numel() / (time.perf_counter() - start)


@contextmanager
def engine_named(ranker: Rank1, name: str, batch: int):
    """A ranker over ``ranker``'s model as engine ``name`` with ``batch`` rows; "continuous-eager" turns the
    captured decode step off. Its engine (cache, graphs) lives until the block ends."""
    saved = runner_module.graphable
    if name.endswith("-eager"):
        runner_module.graphable = lambda model: False
    other = Rank1.from_model(ranker.model, ranker.tokenizer, max_new_tokens=ranker.max_new_tokens,
                             context_size=ranker.context_size, engine=name.removesuffix("-eager"), batch_size=batch)
    try:
        yield other
    finally:
        other.close()
        runner_module.graphable = saved


def step_ms(ranker: Rank1, tok, engine: str, batch: int, steps: int, first: int = 1, words: int = 40) -> float:
    """ms per decode step: judge ``batch`` pairs planted to reason ``steps`` tokens, minus a ``first``-step run
    (so the figure is the cost of a step with ``first``..``steps`` reasoning tokens in the cache)."""
    # one prompt length, so every row gets the planted length; distinct, as identical pairs are judged once
    pairs = same_length_pairs(tok, batch, "passage " * words)
    n = len(tok(build_prompt(*pairs[0]))["input_ids"])
    times = []
    with engine_named(ranker, engine, batch) as named:
        for length in (1, first, steps):  # the first run only warms up (allocator, kernels, lazy init, capture)
            handle = plant_lengths(ranker.model, tok, {n: length})
            sync()
            start = time.perf_counter()
            named.judge(pairs)
            sync()
            times.append(time.perf_counter() - start)
            handle.remove()
    return 1000 * (times[2] - times[1]) / (steps - first)


class ForwardClock:
    """Wall time spent inside ``model.forward`` (synchronized), to split engine overhead from model time.

    A replayed CUDA graph calls no forward, so for "continuous" on a GPU this counts only its eager calls
    (prefill, closing passes); it stays out of a capture, where a synchronize is not allowed.
    """

    def __init__(self, model):
        self.total = 0.0
        self._start = 0.0
        self.handles = [model.register_forward_pre_hook(self._pre), model.register_forward_hook(self._post)]

    def _pre(self, module, args):
        if not capturing():
            sync()
            self._start = time.perf_counter()

    def _post(self, module, args, output):
        if not capturing():
            sync()
            self.total += time.perf_counter() - self._start

    def remove(self):
        for handle in self.handles:
            handle.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--long", action="store_true", help="rank1's lengths: ~500-token prompts, 1000-1256 reasoning tokens")
    ap.add_argument("--skip-workload", action="store_true")
    ap.add_argument("--skip-steps", action="store_true", help="only the workload-1 run")
    ap.add_argument("--engines", nargs="+", default=["generate", "continuous-eager", "continuous"])
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    tok = qwen_tokenizer()
    with torch.device(device):  # build on the GPU: a 7B float32 init on the host would take minutes
        model = tiny_model(tok, "qwen2", initializer_range=0.02, **SHAPES[args.shape]).to(dtype=dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth(device)
    floor_ms = 1000 * weight_bytes / bandwidth
    print(f"# {name}, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, shape {args.shape}, {dtype}")
    print(f"weights {weight_bytes / 2**30:.2f} GiB, copy bandwidth {bandwidth / 2**30:.0f} GiB/s, "
          f"bandwidth floor {floor_ms:.2f} ms per decode step\n")
    start, steps, words = (1000, 1256, 490) if args.long else (1, args.steps, 40)
    ranker = Rank1.from_model(model, tok, max_new_tokens=max(steps, 1200) + 8)
    prompt_tokens = len(tok(build_prompt("a query", "passage " * words))["input_ids"])
    from rank1_hf.kv_budget import kv_bytes_per_token

    kv_token = kv_bytes_per_token(model)
    # Engines alternate and each figure is the median of --repeats measurements, so a machine that
    # warms up (clocks, lazily loaded kernels, host memory growing) does not favour the engine run last.
    measured: dict[tuple[str, int], list[float]] = {}
    for _ in range(0 if args.skip_steps else args.repeats):
        for batch in args.batches:
            for engine in args.engines:
                measured.setdefault((engine, batch), []).append(
                    step_ms(ranker, tok, engine, batch, steps, start, words))
    context = prompt_tokens + (start + steps) / 2  # tokens in each row's cache, on average over the steps timed
    print(f"prompt {prompt_tokens} tokens, reasoning {start}..{steps}: KV {kv_token / 2**10:.0f} KiB per token\n")
    print(f"| engine | batch | ms / decode step (median of {args.repeats}) | all | floor ms (weights + KV) | x floor | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for (engine, batch), values in sorted(measured.items()):
        ms = statistics.median(values)
        floor = 1000 * (weight_bytes + batch * context * kv_token) / bandwidth
        print(f"| {engine} | {batch} | {ms:.2f} | {' '.join(f'{v:.1f}' for v in values)} | {floor:.2f} | "
              f"{ms / floor:.2f} | {batch * 1000 / ms:.0f} |")
    sys.stdout.flush()
    if args.skip_workload:
        return
    pairs, planted, never = workload(1, tok, args.pairs)
    handle = plant_lengths(model, tok, planted, never)
    print("\n| engine (workload 1) | pairs | s | pairs/s | generated tokens/s | steps | s in forward | slot eff "
          "| same reasoning as eager | max score diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    eager = None
    for engine in ("continuous-eager", *args.engines, "continuous"):  # eager first: the others compare to it
        clock = ForwardClock(model)
        sync()
        start = time.perf_counter()
        with engine_named(ranker, engine, 64) as named:
            result = named.judge_with_stats(pairs)
        sync()
        elapsed = time.perf_counter() - start
        clock.remove()
        judged, st = result.judgements, result.stats
        eager = eager or judged
        same = sum(a.reasoning == b.reasoning for a, b in zip(judged, eager)) / len(pairs)
        diff = max(abs(a.score - b.score) for a, b in zip(judged, eager))
        print(f"| {engine} | {len(pairs)} | {elapsed:.1f} | {len(pairs) / elapsed:.2f} | "
              f"{st.generated_tokens / elapsed:.0f} | {st.steps} | {clock.total:.1f} | "
              f"{st.generated_tokens / max(st.decode_slots, 1):.3f} | {same:.3f} | {diff:.2e} |")
        sys.stdout.flush()
    handle.remove()


if __name__ == "__main__":
    main()
