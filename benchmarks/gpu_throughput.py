"""Decode-step cost and throughput on a lent GPU (issues 5, 37, 38): a few minutes on one H100/H200.

    python benchmarks/gpu_throughput.py                 # 7B-shaped Qwen2, random weights, bfloat16
    python benchmarks/gpu_throughput.py --shape tiny    # a smoke run (CPU is fine)

Prints, as markdown to paste into benchmarks/RESULTS.md with the card's name and the date, each line
flushed as soon as it is measured (a call cut short keeps every figure measured before):
1. ms per decode step at each batch for each engine, with the memory-bandwidth floor beside it (weight
   bytes + the key/value bytes each step must read, over measured device-to-device copy bandwidth), the
   time and memory of capturing every decode bucket (``warmup``) and the graphs captured so far;
2. with --long (rank1's real lengths): each row's cache holds ~1,500 tokens when the steps are timed, as
   after a 500-token prompt and 1,000 reasoning tokens. The tokens are prefilled (a ~1,500-token prompt)
   rather than decoded, so each (engine, batch) takes seconds rather than minutes;
3. pairs/s of each engine on workload 1 of benchmarks/throughput.py (heavy-tailed planted lengths), and
   how many rows reason exactly as the eager continuous engine does (bfloat16: different GEMM shapes can
   flip near-ties), with the largest score difference.
Reasoning lengths are planted (tests/plant.py) so each step count is known in advance. ``--budget`` skips
what would start after that many seconds, so the script ends inside a device call's limit.

Engines: "generate" (model.generate), "continuous" (engine v2; on one GPU its decode steps are CUDA graphs,
rank1_hf/engine/decode_step.py) and "continuous-eager" (the same engine with graphs turned off).

    python benchmarks/gpu_throughput.py --long --batches 1 16 64 128 --skip-workload
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
from rank1_hf.engine import decode_step  # noqa: E402
from rank1_hf.engine import continuous as engine_module  # noqa: E402
from rank1_hf.engine import runner as runner_module  # noqa: E402
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
    captured decode step off; "continuous-lookup" verifies prompt-lookup drafts (eager verification steps
    beside captured plain ones); the others decode plainly. Its engine (cache, graphs) lives until the
    block ends."""
    saved = runner_module.graphable
    if name.endswith("-eager"):
        runner_module.graphable = lambda model: False
    speculate = "prompt-lookup" if name.endswith("-lookup") else "off"
    other = Rank1.from_model(ranker.model, ranker.tokenizer, max_new_tokens=ranker.max_new_tokens,
                             context_size=ranker.context_size, engine=name.split("-")[0], batch_size=batch,
                             speculate=speculate)
    try:
        yield other
    finally:
        other.close()
        runner_module.graphable = saved


class Captures:
    """Decode-step graphs captured and failed, counted at StaticDecode._capture (every engine's)."""

    def __init__(self):
        self.captured = self.failed = 0
        self._saved = decode_step.StaticDecode._capture
        counts, capture = self, self._saved

        def counted(static, rows, width):
            graph = capture(static, rows, width)
            if graph is None:
                counts.failed += 1
            else:
                counts.captured += 1
            return graph

        decode_step.StaticDecode._capture = counted

    def __str__(self) -> str:
        return f"{self.captured} captured" + (f", {self.failed} FAILED" if self.failed else "")


class DecodeClock:
    """Wall time of each continuous-engine decode step (its results are read on the host, so each
    time is the step's whole cost: host work, replay or eager forward, the copy back)."""

    def __init__(self):
        self.times: list[float] = []
        self._saved = engine_module.ContinuousEngine._decode
        clock, decode = self, self._saved

        def timed(engine):
            start = time.perf_counter()
            decode(engine)
            clock.times.append(time.perf_counter() - start)

        engine_module.ContinuousEngine._decode = timed

    def remove(self) -> None:
        engine_module.ContinuousEngine._decode = self._saved


def memory() -> float:
    return torch.cuda.memory_reserved() / 2**30 if torch.cuda.is_available() else 0.0


def measure(ranker: Rank1, tok, engine: str, batch: int, first: int, steps: int,
            words: int) -> tuple[float, float, float]:
    """(ms per decode step, s to warm up, GiB the warm-up reserved) for ``batch`` rows each holding a
    prompt of about ``words`` tokens: the median of the last ``steps`` decode steps of a run planted to
    reason ``first + steps`` tokens (the first steps meet the allocator and lazy captures).

    ``generate`` has no decode hook: its figure is (run with ``first + steps`` tokens - run with
    ``first``) / steps."""
    pairs = same_length_pairs(tok, batch, "passage " * words)  # one prompt length: every row reasons alike
    n = len(tok(build_prompt(*pairs[0]))["input_ids"])
    with engine_named(ranker, engine, batch) as named:
        before = memory()
        sync()
        start = time.perf_counter()
        named.warmup()  # the pool and, on a GPU, every decode bucket's graph
        sync()
        warm, held = time.perf_counter() - start, memory() - before
        runs = []
        for length in ((first + steps,) if engine.startswith("continuous") else (first, first + steps)):
            handle = plant_lengths(ranker.model, tok, {n: length})
            clock = DecodeClock()
            try:
                sync()
                start = time.perf_counter()
                named.judge(pairs)
                sync()
                runs.append(time.perf_counter() - start)
            finally:
                clock.remove()
                handle.remove()
    if engine.startswith("continuous"):
        return 1000 * statistics.median(clock.times[-steps:]), warm, held
    return 1000 * (runs[1] - runs[0]) / steps, warm, held


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
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed per (engine, batch)")
    ap.add_argument("--pairs", type=int, default=128)
    ap.add_argument("--budget", type=float, default=float("inf"), help="start nothing after this many seconds")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--long", action="store_true", help="rank1's lengths: ~1,500 tokens per row when timed")
    ap.add_argument("--skip-workload", action="store_true")
    ap.add_argument("--skip-steps", action="store_true", help="only the workload-1 run")
    ap.add_argument("--engines", nargs="+", default=["generate", "continuous-eager", "continuous"],
                    help="also continuous-lookup: speculation by prompt lookup")
    ap.add_argument("--workload-batch", type=int, default=64, help="rows in flight in the workload-1 run")
    args = ap.parse_args()
    began = time.perf_counter()
    captures = Captures()
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
    first, steps = 8, args.steps
    words = 1470 if args.long else 40  # about one token a word: ~500 prompt tokens + ~1,000 reasoning tokens
    prompt_tokens = len(tok(build_prompt("a query", "passage " * words))["input_ids"])
    # Rows as long as the run needs (the captured widths stop at the capacity, as they would for users
    # who set context_size to their lengths).
    ranker = Rank1.from_model(model, tok, max_new_tokens=first + steps + 8,
                              context_size=prompt_tokens + first + steps + 16)
    from rank1_hf.model.kv_budget import kv_bytes_per_token

    kv_token = kv_bytes_per_token(model)
    context = prompt_tokens + first + steps / 2  # tokens in each row's cache, on average over the steps timed
    if not args.skip_steps:
        print(f"prompt {prompt_tokens} tokens, reasoning {first}..{first + steps}: KV {kv_token / 2**10:.0f} KiB per "
              f"token; each step timed with ~{context:.0f} tokens in every row's cache\n")
        print("| engine | batch | ms / decode step (median) | floor ms (weights + KV) | x floor | tokens/s "
              "| warm-up s | warm-up GiB | graphs so far |")
        print("|---|---|---|---|---|---|---|---|---|", flush=True)
    # Engines alternate within a batch, so a machine that warms up (clocks, lazily loaded kernels) does
    # not favour the engine run last.
    for batch in [] if args.skip_steps else args.batches:
        for engine in args.engines:
            if time.perf_counter() - began > args.budget:
                print(f"| {engine} | {batch} | skipped: past the {args.budget:.0f} s budget |", flush=True)
                continue
            ms, warm, held = measure(ranker, tok, engine, batch, first, steps, words)
            floor = 1000 * (weight_bytes + batch * context * kv_token) / bandwidth
            print(f"| {engine} | {batch} | {ms:.2f} | {floor:.2f} | {ms / floor:.2f} | {batch * 1000 / ms:.0f} | "
                  f"{warm:.1f} | {held:.2f} | {captures} |", flush=True)
    if args.skip_workload:
        print(f"\ngraphs: {captures}", flush=True)
        return
    pairs, planted, never = workload(1, tok, args.pairs)
    ranker = Rank1.from_model(model, tok, max_new_tokens=max(planted.values()) + 8)
    handle = plant_lengths(model, tok, planted, never)
    print(f"\n| engine (workload 1, {args.workload_batch} rows) | pairs | s | pairs/s | generated tokens/s | steps "
          "| drafts accepted | s in forward | slot eff | same reasoning as eager | max score diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    eager = None
    # eager first: the others compare to it
    for engine in dict.fromkeys(("continuous-eager", *args.engines, "continuous")):
        if time.perf_counter() - began > args.budget:
            print(f"| {engine} | skipped: past the {args.budget:.0f} s budget |", flush=True)
            continue
        clock = ForwardClock(model)
        sync()
        start = time.perf_counter()
        with engine_named(ranker, engine, args.workload_batch) as named:
            result = named.judge_with_stats(pairs)
        sync()
        elapsed = time.perf_counter() - start
        clock.remove()
        judged, st = result.judgements, result.stats
        eager = eager or judged
        same = sum(a.reasoning == b.reasoning for a, b in zip(judged, eager)) / len(pairs)
        diff = max(abs(a.score - b.score) for a, b in zip(judged, eager))
        print(f"| {engine} | {len(pairs)} | {elapsed:.1f} | {len(pairs) / elapsed:.2f} | "
              f"{st.generated_tokens / elapsed:.0f} | {st.steps} | {st.accepted_tokens}/{st.draft_tokens} | "
              f"{clock.total:.1f} | "
              f"{st.generated_tokens / max(st.decode_slots, 1):.3f} | {same:.3f} | {diff:.2e} |", flush=True)
    print(f"\ngraphs: {captures}", flush=True)
    handle.remove()


if __name__ == "__main__":
    main()
