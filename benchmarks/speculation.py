"""Speculative decoding by prompt lookup (--speculate prompt-lookup) against plain decoding, in ONE sitting.

    python benchmarks/speculation.py                       # all three workloads at 1, 8 and 64 rows
    python benchmarks/speculation.py --workloads a --rows 1 8 --rounds 2

Workloads:
  a  natural reasoning from real weights: the demo model (SmolLM2-135M-Instruct, float32) prompted through
     its chat template to reason about a query and a passage, quoting the passage; greedy, 160 tokens;
  b  the bundled sample's pairs through the rank1 prompt on the same model (its text repeats itself:
     reported, not tuned to);
  c  a random-weight Qwen2 (4 layers, hidden 512, the real Qwen2.5 tokenizer, </think>'s row scaled as in
     benchmarks/vllm_compare.py): drafts almost never match, so this is the cost of trying.

For each workload and row count the same prompts run with speculation off and on (each --configs
setting), alternating (off, on, off, on ...), the fastest run of each kept (wall seconds, and the
process's CPU seconds, which another process's load on shared cores disturbs less). Printed: decode steps per generated token, the acceptance rate,
seconds, and the ratios on/off (steps and time; < 1: speculation faster), and whether every row's tokens
and readout agree (tokens equal, readout logits within 1e-4). No OMP_WAIT_POLICY, as users run it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import deque
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rank1_hf import Rank1  # noqa: E402
from rank1_hf.engine import speculation  # noqa: E402
from rank1_hf.engine.continuous import ContinuousEngine  # noqa: E402
from rank1_hf.engine.types import Request  # noqa: E402
from rank1_hf.prompt import build_prompt  # noqa: E402

# Short factual passages and questions about them, for workload a.
PASSAGES = [
    ("how do cats purr", "Cats purr by rapidly twitching the muscles of the larynx, which opens and closes the glottis. "
     "The vibration happens as the cat breathes in and out, producing a continuous sound between 25 and 150 hertz."),
    ("why does bread rise", "Bread rises because yeast ferments the sugars in the dough and releases carbon dioxide. "
     "The gas is trapped by the gluten network, which stretches, so the dough expands before and during baking."),
    ("what causes rain", "Rain forms when water vapour in a cloud condenses onto tiny particles and the droplets merge. "
     "When the drops grow too heavy for the rising air to hold, they fall to the ground as rain."),
    ("how does a compiler work", "A compiler reads source code, splits it into tokens, parses the tokens into a syntax "
     "tree, checks the types, and then translates the tree into machine code that the processor can run."),
    ("what is vitamin d for", "Vitamin D helps the body absorb calcium and phosphate from food, which keeps bones and "
     "teeth healthy. The skin makes vitamin D when it is exposed to sunlight."),
    ("who decides a court case", "In a jury trial the jury decides the facts of the case and returns a verdict, while "
     "the judge rules on the law, instructs the jury and passes the sentence."),
    ("how do batteries store energy", "A battery stores energy chemically. During discharge, a reaction at the anode "
     "releases electrons that flow through the circuit to the cathode, producing an electric current."),
    ("why are museums free", "Many national museums are free because governments fund them so that everyone can see the "
     "collections. Special exhibitions often still charge a fee to cover their costs."),
]
INSTRUCTION = ("Query: {query}\nPassage: {passage}\n\nDoes the passage answer the query? First copy the passage's "
               "sentences that matter word for word, then explain your reasoning step by step, then answer true or false.")


def chat_requests(tok, n: int) -> list[Request]:
    out = []
    for k in range(n):
        query, passage = PASSAGES[k % len(PASSAGES)]
        text = tok.apply_chat_template([{"role": "user", "content": INSTRUCTION.format(query=query, passage=passage)}],
                                       tokenize=False, add_generation_prompt=True)
        out.append(Request(k, tok(text, add_special_tokens=False)["input_ids"], text))
    return out


def rank1_requests(ranker: Rank1, pairs, n: int) -> list[Request]:
    out = []
    for k in range(n):
        q, p = pairs[k % len(pairs)]
        prepared = ranker.prepare(q, p)
        out.append(Request(k, prepared.ids, prepared.prompt))
    return out


def sample_pairs() -> list[tuple[str, str]]:
    from rank1_hf.io import formats

    paths = formats.sample_paths()
    queries, corpus = formats.read_queries(paths["queries"]), formats.read_corpus(paths["corpus"])
    run = formats.read_run(paths["run"])
    return [(queries[q], corpus[d]) for q in sorted(run) for d, _ in formats.ranked(run[q])]


def run_engine(model, settings, requests, rows: int, config: tuple[int, int] | None):
    """One run of ``requests`` at ``rows`` rows: plain (config None) or speculating with (max drafts, budget)."""
    if config is not None:
        speculation.MAX_DRAFTS, speculation.STEP_BUDGET = config
    settings = dataclasses.replace(settings, speculate=config is not None, batch_size=rows)
    engine = ContinuousEngine(model, settings)
    waiting = deque(requests)
    done = {}
    start, cpu = time.perf_counter(), time.process_time()
    while waiting or engine.rows:
        for request, generation in engine.step(waiting):
            done[request.id] = generation
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    engine.close()
    return (seconds, cpu), engine.stats, [done[r.id] for r in requests]


def same(a, b) -> bool:
    return all(x.tokens == y.tokens and max(abs(p - q) for p, q in zip(x.readout, y.readout)) <= 1e-4
               for x, y in zip(a, b))


def measure(name: str, model, settings, requests_for, rows_list, rounds: int, configs) -> dict[int, list[list[int]]]:
    """Print the table of one workload; returns plain decoding's tokens per row count."""
    print(f"\n### workload {name}\n")
    print("| rows | pairs | tokens | drafts, budget | steps/token off | steps/token on | acceptance | s off | s on | "
          "steps on/off | time on/off | CPU s off | CPU s on | CPU on/off | same |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    tokens_off = {}
    for rows in rows_list:
        requests = requests_for(rows)
        best, results, cpus = {}, {}, {}
        for _ in range(rounds):
            for config in [None, *configs]:  # off, then each configuration, alternating round by round
                (seconds, cpu), stats, gens = run_engine(model, settings, requests, rows, config)
                if config not in best or seconds < best[config][0]:
                    best[config] = (seconds, stats)
                cpus[config] = min(cpus.get(config, cpu), cpu)
                results[config] = gens
        s_off, off = best[None]
        tokens = off.generated_tokens
        tokens_off[rows] = [g.tokens for g in results[None]]
        for config in configs:
            s_on, on = best[config]
            acc = f"{on.acceptance:.0%} ({on.accepted_tokens}/{on.draft_tokens})" if on.draft_tokens else "-"
            print(f"| {rows} | {len(requests)} | {tokens} | {config[0]}, {config[1]} | {off.steps / tokens:.3f} | "
                  f"{on.steps / tokens:.3f} | {acc} | {s_off:.1f} | {s_on:.1f} | {on.steps / off.steps:.2f} | "
                  f"{s_on / s_off:.2f} | {cpus[None]:.1f} | {cpus[config]:.1f} | {cpus[config] / cpus[None]:.2f} | "
                  f"{same(results[None], results[config])} |", flush=True)
    return tokens_off


VLLM_CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    spec = json.load(open(sys.argv[1]))
    extra = {}
    if spec["ngram"]:
        extra["speculative_config"] = {"method": "ngram", "num_speculative_tokens": spec["drafts"],
                                       "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    llm = LLM(spec["model"], dtype="float32", max_model_len=4096, max_num_seqs=spec["rows"], seed=0, **extra)
    params = SamplingParams(temperature=0, max_tokens=spec["max_new_tokens"])
    prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompt_ids"]]
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    out = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    json.dump({"seconds": seconds, "tokens": [list(o.outputs[0].token_ids) for o in out]}, open(sys.argv[2], "w"))
    """
)


def run_vllm(python: str, model_dir: str, requests, rows: int, max_new: int, ngram: bool, drafts: int, eos) -> dict:
    """vLLM's CPU build on the same weights and prompt ids (its ngram speculation when ``ngram``), in its own
    process; None (and a note) when it fails."""
    spec = {"model": model_dir, "prompt_ids": [r.ids for r in requests], "rows": rows, "max_new_tokens": max_new,
            "ngram": ngram, "drafts": drafts}
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "spec.json").write_text(json.dumps(spec))
        Path(tmp, "run.py").write_text(VLLM_CHILD)
        env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="2")
        done = subprocess.run([python, str(Path(tmp, "run.py")), str(Path(tmp, "spec.json")), str(Path(tmp, "out.json"))],
                              env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            print(f"vLLM ({'ngram' if ngram else 'plain'}) failed: {done.stderr.strip().splitlines()[-1:]}", flush=True)
            return None
        out = json.loads(Path(tmp, "out.json").read_text())
    out["tokens"] = [t[:-1] if t and t[-1] in eos else t for t in out["tokens"]]
    return out


def measure_vllm(python: str, model_dir: str, settings, requests_for, rows_list, max_new: int, ours) -> None:
    print("\n| rows | vLLM s plain | vLLM s ngram | ngram/plain | tokens as ours (plain, ngram) |")
    print("|---|---|---|---|---|")
    for rows in rows_list:
        requests = requests_for(rows)
        mine = ours[rows]
        got = {ngram: run_vllm(python, model_dir, requests, rows, max_new, ngram, speculation.MAX_DRAFTS,
                               settings.eos_ids) for ngram in (False, True)}
        if got[False] is None or got[True] is None:
            continue
        agree = [sum(a == b for a, b in zip(got[k]["tokens"], mine)) for k in (False, True)]
        print(f"| {rows} | {got[False]['seconds']:.1f} | {got[True]['seconds']:.1f} | "
              f"{got[True]['seconds'] / got[False]['seconds']:.2f} | {agree[0]}/{len(mine)}, {agree[1]}/{len(mine)} |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--configs", nargs="+", default=[f"{speculation.MAX_DRAFTS}:{speculation.STEP_BUDGET}"],
                        help="speculation settings to run, each MAX_DRAFTS:STEP_BUDGET (default: the library's)")
    parser.add_argument("--vllm-python", help="a vLLM CPU venv's python: workload a on vLLM too, plain and ngram")
    parser.add_argument("--pairs-per-row", type=int, default=4, help="pairs queued per row (a job's throughput)")
    parser.add_argument("--most-pairs", type=int, default=64)
    args = parser.parse_args()
    configs = [tuple(int(x) for x in c.split(":")) for c in args.configs]
    n = lambda rows: max(rows, min(args.most_pairs, args.pairs_per_row * rows))  # noqa: E731
    print(f"torch threads: {torch.get_num_threads()}, max_new_tokens {args.max_new_tokens}")
    if {"a", "b"} & set(args.workloads):
        from rank1_hf.model.assets import smollm2

        demo = Rank1(str(smollm2()), max_new_tokens=args.max_new_tokens, context_size=4096, show_progress_bar=False)
        settings = demo.core.settings
        if "a" in args.workloads:
            chats = lambda rows: chat_requests(demo.tokenizer, n(rows))  # noqa: E731
            ours = measure("a (SmolLM2, chat template, quoting)", demo.model, settings, chats, args.rows, args.rounds,
                           configs)
            if args.vllm_python:
                measure_vllm(args.vllm_python, str(smollm2()), settings, chats, args.rows, args.max_new_tokens, ours)
        if "b" in args.workloads:
            pairs = sample_pairs()
            measure("b (SmolLM2, bundled sample, rank1 prompt)", demo.model, settings,
                    lambda rows: rank1_requests(demo, pairs, n(rows)), args.rows, args.rounds, configs)
    if "c" in args.workloads:
        import tempfile

        from vllm_compare import make_model, make_pairs

        with tempfile.TemporaryDirectory() as tmp:
            make_model(Path(tmp), answered=True)
            ranker = Rank1(tmp, max_new_tokens=args.max_new_tokens, context_size=4096, show_progress_bar=False)
            pairs = make_pairs(64)
            measure("c (random Qwen2, 4 layers, hidden 512: the cost of trying)", ranker.model, ranker.core.settings,
                    lambda rows: rank1_requests(ranker, pairs, n(rows)), args.rows, args.rounds, configs)


if __name__ == "__main__":
    main()
