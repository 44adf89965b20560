"""Planning a run at MS MARCO scale: peak memory and time to read the inputs and plan one shard (no judging).

Makes a synthetic first-stage run (default 7,000 queries x 100 = 700,000 lines, about MS MARCO dev's
top-100), its queries and a BEIR corpus.jsonl larger than the run needs (default 2,000,000 passages), and a
judgement store holding half of the pairs, then measures, each in a fresh child process (peak RSS is the
child's own high-water mark, VmHWM):

* baseline: importing rank1_hf.pipeline;
* plan: ``load_items`` (reads the run, then keeps only the queries and passages it names) and
  ``plan_job`` for shard 0 of 8 against the store (the store keys of all pairs, the shard's pairs, which
  of them are stored): what every shard job and launcher rank does before judging;
* whole corpus: ``formats.read_corpus`` without ``keep=`` (what reading the inputs cost before: the corpus
  was held whole), for the ratio.

    python benchmarks/plan_scale.py                      # the defaults above (about 1 GB of files)
    python benchmarks/plan_scale.py --queries 700 --corpus 200000 --dir /tmp/plan-small

No model is loaded: planning needs only the settings and the dataset prompt (a stand-in object here).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("cat dog bread oven yeast river mountain law court judge software python compiler vitamin protein "
         "football goal rain cloud engine battery museum painting harbour glacier violin theorem").split()

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from rank1_hf import pipeline
from rank1_hf.io import formats
from rank1_hf.io.store import JudgementStore

class Settings:  # stands in for a loaded Rank1: planning reads only these two
    dataset_prompt = None
    def settings(self):
        return {"model": "synthetic", "max_new_tokens": 8192}

what, d = sys.argv[2], sys.argv[3]
started = time.monotonic()
out = {}
if what == "plan":
    items = pipeline.load_items(f"{d}/run.trec", f"{d}/queries.tsv", f"{d}/corpus.jsonl", top_k=100)
    out["read_s"] = time.monotonic() - started
    with JudgementStore(f"{d}/store.sqlite", readonly=True) as store:
        plan = pipeline.plan_job(Settings(), items, [store], pipeline.Shard(0, 8))
    out.update(pairs=len(items), shard_pairs=len(plan.first), stored=len(plan.found), todo=len(plan.todo))
elif what == "load":
    out["pairs"] = len(pipeline.load_items(f"{d}/run.trec", f"{d}/queries.tsv", f"{d}/corpus.jsonl", top_k=100))
elif what == "whole-corpus":
    out["passages"] = len(formats.read_corpus(f"{d}/corpus.jsonl"))
out["seconds"] = time.monotonic() - started
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through exec.
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
out["peak_rss_mib"] = int(hwm.split()[1]) / 1024
print(json.dumps(out))
"""


def make_inputs(d: Path, queries: int, per_query: int, corpus: int, seed: int = 0) -> dict[str, float]:
    """Write run.trec, queries.tsv, corpus.jsonl and a store holding every other pair; returns sizes."""
    rng = random.Random(seed)
    with open(d / "queries.tsv", "w") as f:
        for q in range(queries):
            f.write(f"q{q}\t{' '.join(rng.choices(WORDS, k=8))}\n")
    with open(d / "corpus.jsonl", "w") as f:
        for i in range(corpus):  # about 60 words a passage, MS MARCO's average
            f.write(json.dumps({"_id": f"d{i}", "title": rng.choice(WORDS), "text": " ".join(rng.choices(WORDS, k=60))})
                    + "\n")
    with open(d / "run.trec", "w") as f:
        for q in range(queries):
            for rank, doc in enumerate(rng.sample(range(corpus), per_query), 1):
                f.write(f"q{q} Q0 d{doc} {rank} {100.0 - rank / 7:.4f} bm25\n")
    sys.path.insert(0, str(ROOT))
    from rank1_hf import pipeline
    from rank1_hf.judgement import Judgement
    from rank1_hf.io.store import JudgementStore

    class Settings:
        dataset_prompt = None

        def settings(self):
            return {"model": "synthetic", "max_new_tokens": 8192}

    items = pipeline.load_items(d / "run.trec", d / "queries.tsv", d / "corpus.jsonl")
    j = Judgement(0.5, "answered", "a short stand-in reasoning", 5, 100, 0.0, 0.0, False)
    with JudgementStore(d / "store.sqlite", journal="delete") as store:
        skey = store.register_settings(Settings().settings())
        keys = [pipeline.item_key(Settings(), it) for it in items[::2]]
        for start in range(0, len(keys), 10_000):
            store.put_many(skey, [(k, j) for k in keys[start:start + 10_000]])
    return {name: (d / name).stat().st_size / 2**20 for name in ("run.trec", "queries.tsv", "corpus.jsonl", "store.sqlite")}


def measure(what: str, d: Path, root: Path = ROOT) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(root), what, str(d)], capture_output=True, text=True,
                          check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=7000)
    ap.add_argument("--per-query", type=int, default=100)
    ap.add_argument("--corpus", type=int, default=2_000_000, help="passages in corpus.jsonl")
    ap.add_argument("--dir", help="where the synthetic files go (default: a temporary folder)")
    ap.add_argument("--reuse", action="store_true", help="the files in --dir are already made")
    ap.add_argument("--compare-with", metavar="ROOT",
                    help="also time load_items imported from another checkout (e.g. one before a change)")
    args = ap.parse_args()
    d = Path(args.dir or tempfile.mkdtemp(prefix="plan-scale-"))
    d.mkdir(parents=True, exist_ok=True)
    if not args.reuse:
        started = time.monotonic()
        sizes = make_inputs(d, args.queries, args.per_query, args.corpus)
        print(f"inputs in {d} ({time.monotonic() - started:.0f} s to make): "
              + ", ".join(f"{name} {mib:.0f} MiB" for name, mib in sizes.items()))
    for label, root in [("this checkout", ROOT)] + ([("--compare-with", Path(args.compare_with))] if args.compare_with else []):
        load = measure("load", d, root)
        print(f"load_items only, {label} ({root}): {load['seconds']:.1f} s, peak RSS {load['peak_rss_mib']:.0f} MiB")
    base = measure("baseline", d)
    plan = measure("plan", d)
    whole = measure("whole-corpus", d)
    print(f"baseline (import rank1_hf.pipeline): peak RSS {base['peak_rss_mib']:.0f} MiB")
    print(f"plan shard 0/8 of {plan['pairs']:,} pairs ({plan['shard_pairs']:,} in the shard, {plan['stored']:,} "
          f"stored, {plan['todo']:,} to judge): {plan['seconds']:.1f} s ({plan['read_s']:.1f} s reading the inputs), "
          f"peak RSS {plan['peak_rss_mib']:.0f} MiB ({plan['peak_rss_mib'] - base['peak_rss_mib']:.0f} MiB over baseline)")
    print(f"whole corpus held ({whole['passages']:,} passages, the old way of reading it): {whole['seconds']:.1f} s, "
          f"peak RSS {whole['peak_rss_mib']:.0f} MiB ({whole['peak_rss_mib'] - base['peak_rss_mib']:.0f} MiB over "
          "baseline)")
    print(f"ratio, peak over baseline, whole corpus / whole plan: "
          f"{(whole['peak_rss_mib'] - base['peak_rss_mib']) / (plan['peak_rss_mib'] - base['peak_rss_mib']):.2f}")


if __name__ == "__main__":
    main()
