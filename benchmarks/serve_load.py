"""Load test of ``rank1-hf serve`` on 127.0.0.1 with a tiny model on CPU (not a timed test).

1. ``--requests`` requests of ``--docs`` documents from ``--concurrency`` concurrent clients, then the same
   requests one at a time: every response must carry the library's scores (Rank1 on the same weights in
   this process, within 1e-4); p50/p95 latency and pairs/s for both.
2. 8 concurrent requests of 4 documents against one request of the same 32 documents (goal: within 1.3x).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/serve_load.py [--requests 200 --concurrency 16 --docs 4]

Every request loop is bounded in count and in time (``--deadline`` seconds per phase).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import make_pairs  # noqa: E402
from server_process import Server, save_tiny_model  # noqa: E402

from rank1_hf import Rank1  # noqa: E402

MAX_NEW = 48
FLAGS = ["--max-new-tokens", str(MAX_NEW), "--context-size", "4096", "--batch-size", "16", "--log-level", "warning"]


def workload(requests: int, docs: int, seed: int) -> list[tuple[str, list[str]]]:
    pairs = make_pairs(requests * docs, seed=seed, max_words=40)
    return [(f"{pairs[k * docs][0]} #{seed}-{k}", [p for _, p in pairs[k * docs:(k + 1) * docs]]) for k in range(requests)]


async def send_all(url: str, requests: list[tuple[str, list[str]]], concurrency: int, deadline: float):
    """(latencies, responses, wall seconds) of every request, ``concurrency`` at a time."""
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = [0.0] * len(requests)
    out: list = [None] * len(requests)

    async def one(client: httpx.AsyncClient, k: int) -> None:
        query, docs = requests[k]
        async with gate:
            started = time.perf_counter()
            r = await client.post("/v2/rerank", json={"model": "rank1", "query": query, "documents": docs})
            latencies[k] = time.perf_counter() - started
            r.raise_for_status()
            out[k] = r.json()

    started = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=deadline, limits=limits) as client:
        await asyncio.wait_for(asyncio.gather(*(one(client, k) for k in range(len(requests)))), deadline)
    return latencies, out, time.perf_counter() - started


def check(responses: list, requests: list[tuple[str, list[str]]], reference: Rank1) -> float:
    """The largest score difference from the library's (and every response complete and best first)."""
    flat = [(q, d) for q, docs in requests for d in docs]
    want = [j.score for j in reference.judge(flat)]
    worst, n = 0.0, 0
    for (query, docs), response in zip(requests, responses):
        results = response["results"]
        assert sorted(r["index"] for r in results) == list(range(len(docs)))
        assert all(a["relevance_score"] >= b["relevance_score"] for a, b in zip(results, results[1:]))
        for r in results:
            worst = max(worst, abs(r["relevance_score"] - want[n + r["index"]]))
        n += len(docs)
    return worst


def row(name: str, latencies: list[float], wall: float, pairs: int) -> str:
    p50 = statistics.median(latencies)
    p95 = statistics.quantiles(latencies, n=20)[18] if len(latencies) > 1 else latencies[0]
    return f"| {name} | {len(latencies)} | {p50 * 1000:.0f} | {p95 * 1000:.0f} | {wall:.1f} | {pairs / wall:.1f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--deadline", type=float, default=600.0, help="seconds each phase may take")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model = save_tiny_model(Path(tmp) / "planted")
        server = Server(model, FLAGS, Path(tmp) / "server.log").wait_healthy()
        reference = Rank1(str(model), max_new_tokens=MAX_NEW, context_size=4096)
        try:
            requests = workload(args.requests, args.docs, seed=1)
            pairs = args.requests * args.docs
            lat_c, out_c, wall_c = asyncio.run(send_all(server.url, requests, args.concurrency, args.deadline))
            lat_s, out_s, wall_s = asyncio.run(send_all(server.url, requests, 1, args.deadline))
            worst = max(check(out_c, requests, reference), check(out_s, requests, reference))
            print(f"{args.requests} requests of {args.docs} documents, max_new_tokens={MAX_NEW}, batch 16, CPU 1 thread")
            print("| clients | requests | p50 ms | p95 ms | wall s | pairs/s |")
            print("|---|---|---|---|---|---|")
            print(row(f"{args.concurrency} concurrent", lat_c, wall_c, pairs))
            print(row("1 at a time", lat_s, wall_s, pairs))
            print(f"all {2 * args.requests} responses succeeded; largest score difference from Rank1: {worst:.2e}")

            eight = workload(8, 4, seed=2)
            one = [(eight[0][0], [d for _, docs in eight for d in docs])]
            eight = [(one[0][0], docs) for _, docs in eight]  # the same query: the same 32 pairs both ways
            _, out8, wall8 = asyncio.run(send_all(server.url, eight, 8, args.deadline))
            _, out1, wall1 = asyncio.run(send_all(server.url, one, 1, args.deadline))
            check(out8, eight, reference), check(out1, one, reference)
            print(f"8 concurrent requests x 4 docs: {wall8:.2f} s; 1 request x 32 docs: {wall1:.2f} s; "
                  f"ratio {wall8 / wall1:.2f}x (goal <= 1.3x)")
        finally:
            reference.close()
            server.stop()


if __name__ == "__main__":
    main()
