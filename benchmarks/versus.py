"""This checkout of rank1-hf against another revision (and vLLM's CPU build) on the same workloads, in ONE sitting.

    python benchmarks/versus.py --base 0ac7eeb                      # this working tree vs a git revision
    python benchmarks/versus.py --base 0ac7eeb --vllm-python DIR/bin/python --rounds 3
    python benchmarks/versus.py --base HEAD~1 --head HEAD            # two revisions

A per-step slowdown shows here before it lands. The workloads are benchmarks/vllm_compare.py's (a small
random Qwen2, 4 layers, hidden 512, with the real Qwen2.5 tokenizer, saved once; 40 pairs): *forced* (64
reasoning tokens, no row closes </think>) and *answered* (</think>'s output row scaled so most rows close
it within 100 tokens). Each revision runs in its own process from a `git archive` of it, loading the same
saved weights, as a user runs it: the caller's main thread calls judge(), no OMP_WAIT_POLICY (pass
--passive to set it, and say so beside the figures). Per revision and workload: one call of all pairs, and
the same pairs as 8 threads x 5 pairs started together. Revisions alternate (base, head, base, head...)
and the fastest run of each is kept. Printed: seconds, decode steps, ms per step, the ratio head / base
(< 1: head faster), and whether the judgements agree (same outcomes, scores within 1e-4): one call of base
against one of head, and each revision's threads against its own one call.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vllm_compare import make_model, make_pairs, run_vllm  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MAX_NEW = {"forced": 64, "answered": 100}

# Runs inside one revision's checkout: only APIs every revision since the first engine has.
CHILD = textwrap.dedent(
    """
    import json, sys, threading, time
    from rank1_hf import Rank1
    spec = json.load(open(sys.argv[1]))
    pairs = [tuple(p) for p in spec["pairs"]]
    from rank1_hf.options import JudgeOptions
    # Plain decode steps unless --speculate says otherwise (issue 31's default "auto" changes what a step is);
    # a revision without the option decodes plainly.
    plain = {"speculate": spec["speculate"]} if hasattr(JudgeOptions, "speculate") else {}
    ranker = Rank1(spec["model"], max_new_tokens=spec["max_new_tokens"], batch_size=len(pairs),
                   show_progress_bar=False, **plain)
    ranker.judge(pairs[:2])  # warm-up: the engine is made here (where engines are kept)
    out = {}
    start = time.perf_counter()
    judged = ranker.judge_with_stats(pairs)
    out["one"] = {"seconds": time.perf_counter() - start, "steps": judged.stats.steps,
                  "scores": [j.score for j in judged.judgements], "outcomes": [j.outcome for j in judged.judgements]}
    callers, each = spec["callers"], len(pairs) // spec["callers"]
    got = [None] * callers
    barrier = threading.Barrier(callers + 1)
    def caller(k):
        barrier.wait()
        got[k] = ranker.judge(pairs[k * each:(k + 1) * each])
    threads = [threading.Thread(target=caller, args=(k,)) for k in range(callers)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    out["threads"] = {"seconds": time.perf_counter() - start,
                      "scores": [j.score for g in got for j in g], "outcomes": [j.outcome for g in got for j in g]}
    json.dump(out, open(sys.argv[2], "w"))
    """
)


def checkout(revision: str, into: Path) -> Path:
    """The tree of ``revision`` (``.`` is this working tree as it is, uncommitted changes included)."""
    if revision == ".":
        return ROOT
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def run_child(tree: Path, spec: Path, out: Path, passive: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    env["PYTHONPATH"] = str(tree)
    env["HF_HUB_OFFLINE"] = "1"
    script = out.with_suffix(".py")
    script.write_text(CHILD)
    subprocess.run([sys.executable, str(script), str(spec), str(out)], check=True, env=env, cwd=tree,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=1800)
    return json.loads(out.read_text())


def agree(a: dict, b: dict) -> str:
    same = a["outcomes"] == b["outcomes"]
    diff = max(abs(x - y) for x, y in zip(a["scores"], b["scores"]))
    return f"{'yes' if same and diff <= 1e-4 else 'NO'} ({diff:.1e})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="git revision to compare with")
    ap.add_argument("--head", default=".", help="git revision, or . for this working tree (default)")
    ap.add_argument("--workloads", default="answered,forced")
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--callers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="alternating runs per revision (the fastest is kept)")
    ap.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON"), help="vLLM's CPU venv python")
    ap.add_argument("--passive", action="store_true", help="set OMP_WAIT_POLICY=PASSIVE in the runs")
    ap.add_argument("--speculate", default="off", choices=["off", "auto", "prompt-lookup"],
                    help="speculation in revisions that have it (default off: plain decode steps everywhere)")
    args = ap.parse_args()
    revisions = {"base": args.base, "head": args.head}
    print(f"# base {args.base}, head {args.head}, {args.pairs} pairs, {args.callers} threads x "
          f"{args.pairs // args.callers}, {args.rounds} alternating rounds, OMP_WAIT_POLICY "
          f"{'PASSIVE' if args.passive else 'unset'}", flush=True)
    print("| workload | run | base s | head s | head / base | base ms/step | head ms/step | head / base per step | "
          "agree | vLLM s | vLLM / head |")
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trees = {name: checkout(rev, tmp / name) for name, rev in revisions.items()}
        from rank1_hf.engine.readout import readout_ids
        from rank1_hf.testing import qwen_tokenizer

        tok = qwen_tokenizer()
        for workload in args.workloads.split(","):
            model = tmp / f"model-{workload}"
            make_model(model, answered=workload == "answered")
            pairs = make_pairs(args.pairs)
            spec = tmp / f"{workload}.json"
            spec.write_text(json.dumps({"model": str(model), "pairs": pairs, "max_new_tokens": MAX_NEW[workload],
                                        "callers": args.callers, "speculate": args.speculate}))
            best: dict = {}
            for r in range(args.rounds):
                for name in ("base", "head"):
                    got = run_child(trees[name], spec, tmp / f"{workload}-{name}-{r}.json", args.passive)
                    for run in ("one", "threads"):
                        if (name, run) not in best or got[run]["seconds"] < best[name, run]["seconds"]:
                            best[name, run] = got[run]
            vllm = (run_vllm(args.vllm_python, model, pairs, MAX_NEW[workload], tok, readout_ids(tok))
                    if args.vllm_python else None)
            for run in ("one", "threads"):
                b, h = best["base", run], best["head", run]
                label = "1 call" if run == "one" else f"{args.callers} threads"
                steps = (f"{1000 * b['seconds'] / b['steps']:.1f} | {1000 * h['seconds'] / h['steps']:.1f} | "
                         f"{(h['seconds'] / h['steps']) / (b['seconds'] / b['steps']):.2f}"
                         if run == "one" else "- | - | -")
                v = (f"{vllm['seconds']:.2f} | {vllm['seconds'] / h['seconds']:.2f}"
                     if vllm is not None and run == "one" else "- | -")
                # one call: base against head; threads: each revision against its own one call (the same pairs)
                agreement = (agree(b, h) if run == "one" else
                             f"base {agree(best['base', 'one'], b)}, head {agree(best['head', 'one'], h)}")
                print(f"| {workload} | {label} | {b['seconds']:.2f} | {h['seconds']:.2f} | "
                      f"{h['seconds'] / b['seconds']:.2f} | {steps} | {agreement} | {v} |", flush=True)
            one = best["head", "one"]["seconds"]
            print(f"#   {workload}: head's {args.callers} threads / its one call = "
                  f"{best['head', 'threads']['seconds'] / one:.2f}", flush=True)


if __name__ == "__main__":
    main()
