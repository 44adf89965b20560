"""The paged pool's gather, before and after issue 38: bytes moved and time per decode step.

    python benchmarks/gpu_gather.py               # 7B-shaped Qwen2 layers (4 KV heads x 128, 28 layers)
    python benchmarks/gpu_gather.py --shape tiny  # a smoke run

Every decode step copies each row's keys and values out of the pool into a (rows, kv_heads, width,
head_dim) tensor for sdpa. Before: element-wise indexing (``pool[read]``, one index per token) up to a
power-of-two width bucket. After: ``index_select`` of whole pages (one index per page) up to a bucket at
most 1.5x the columns (decode_step.width_buckets). The steps' widest rows are spread evenly over
``--widths``; bytes are counted for the whole model (every layer, keys and values) at --rows rows:
written by the gather (and read again by attention), index bytes read, and what transformers' sdpa path
then writes again by repeating each KV head for its query heads (it passes a mask, so sdpa's own GQA is
not used). Time is one layer's keys+values gather, median of --repeats, on this machine's device.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rank1_hf.engine.decode_step import buckets, width_buckets  # noqa: E402
from rank1_hf.model.kv_budget import PAGE_SIZE  # noqa: E402

SHAPES = {
    "7b": dict(layers=28, heads=28, kv_heads=4, head_dim=128),
    "tiny": dict(layers=2, heads=4, kv_heads=2, head_dim=16),
}


def elementwise(pool: torch.Tensor, table: torch.Tensor, width: int, capacity: int) -> torch.Tensor:
    """The gather before: one pool index per (row, column)."""
    columns = torch.arange(width, device=pool.device).clamp(max=capacity - 1)
    read = table[:, columns // PAGE_SIZE] * PAGE_SIZE + columns % PAGE_SIZE
    if width > capacity:
        read[:, capacity:] = 0
    return pool[read].transpose(1, 2)


def pagewise(pool: torch.Tensor, table: torch.Tensor, width: int) -> torch.Tensor:
    """The gather now (kv_cache.PagedCache.update): whole pages, then the columns the step reads."""
    pages = table[:, : -(-width // PAGE_SIZE)].reshape(-1)
    read = pool.view(-1, PAGE_SIZE, *pool.shape[1:]).index_select(0, pages)
    return read.view(table.shape[0], -1, *pool.shape[1:])[:, :width].transpose(1, 2)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--widths", type=int, nargs=2, default=[512, 2048], help="range of the steps' widest rows")
    ap.add_argument("--capacity", type=int, default=2400, help="tokens a row can hold")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    row_pages = -(-args.capacity // PAGE_SIZE)
    capacity = row_pages * PAGE_SIZE
    kv, dim = shape["kv_heads"], shape["head_dim"]
    token_bytes = kv * dim * dtype.itemsize
    model_bytes = 2 * shape["layers"]  # keys and values of every layer
    old_buckets = buckets(capacity + 1, 256)
    new_buckets = width_buckets(capacity + 1, 256, PAGE_SIZE)
    lo, hi = args.widths
    widths = range(lo, hi + 1, 16)
    old_w = statistics.mean(next(b for b in old_buckets if b >= w) for w in widths)
    new_w = statistics.mean(next(b for b in new_buckets if b >= w) for w in widths)
    new_w_pages = statistics.mean(-(-next(b for b in new_buckets if b >= w) // PAGE_SIZE) * PAGE_SIZE for w in widths)
    rows, groups = args.rows, shape["heads"] // kv
    print(f"# {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"shape {args.shape}, {rows} rows, widest row {lo}..{hi} tokens, {dtype}")
    print(f"buckets before {old_buckets}\nbuckets now    {new_buckets}\n", flush=True)
    print("| gather | mean width | GiB written per step | index MiB per step | + sdpa's repeat_kv GiB | "
          "ms per layer (k+v) at the widest |")
    print("|---|---|---|---|---|---|")
    pool = torch.randn(((rows * row_pages + 1) * PAGE_SIZE, kv, dim), dtype=dtype, device=device)
    table = torch.randperm(rows * row_pages, device=device).add_(1).view(rows, row_pages)
    table = torch.cat([table, torch.zeros((rows, 1), dtype=torch.long, device=device)], 1)  # the scratch column
    widest = next(b for b in old_buckets if b >= hi)
    assert torch.equal(elementwise(pool, table[:, :-1], widest, capacity), pagewise(pool, table, widest))
    before = lambda: elementwise(pool, table[:, :-1], widest, capacity)  # noqa: E731
    now = lambda: pagewise(pool, table, widest)  # noqa: E731
    for name, width, written_width, index_per_row, fn in (
        ("element-wise, powers of two", old_w, old_w, old_w, before),
        ("whole pages, 1.5x buckets", new_w, new_w_pages, new_w_pages / PAGE_SIZE, now),
    ):
        written = rows * written_width * token_bytes * model_bytes
        index = rows * index_per_row * 8 * model_bytes
        ms = timed(lambda: (fn(), fn()), args.repeats)
        print(f"| {name} | {width:.0f} | {written / 2**30:.2f} | {index / 2**20:.1f} | "
              f"{groups * rows * width * token_bytes * model_bytes / 2**30:.2f} | {ms:.2f} |", flush=True)


if __name__ == "__main__":
    main()
