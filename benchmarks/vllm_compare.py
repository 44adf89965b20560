"""rank1-hf against vLLM's CPU build on the same saved weights and pairs, in ONE invocation.

    python benchmarks/vllm_compare.py --vllm-python /path/to/vllm-venv/bin/python
    (build that venv with ../shared/tools/make-vllm-venv.sh DIR; vLLM is never a dependency of rank1-hf)

The model is a small random Qwen2 (4 layers, hidden 512, head_dim 64) with the real Qwen2.5 tokenizer,
saved once to a directory that both engines load. Two workloads of 40 pairs:

- forced: 64 reasoning tokens, no row closes </think> (every row takes the forced readout);
- answered: </think>'s output row is scaled in the saved weights so that most rows close it within 100
  tokens; the rest are forced.

vLLM runs rank1 the fast way: greedy with a stop on the </think> id, then a
one-token pass over prompt + reasoning (+ the reference's closing text for unfinished rows), restricted to
" true"/" false", with processed log-probabilities and prefix caching so that pass reuses the cache. Its
scores use the same cut-back rule for unfinished rows. Printed: seconds per engine (generation and
readout, model loading excluded), the time ratio vLLM / rank1-hf (> 1: rank1-hf faster), and agreement.
The order is rank1-hf, vLLM, rank1-hf, so that both see a similar machine; the ratio uses the faster
rank1-hf run and both are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

from rank1_hf import Rank1
from rank1_hf.testing import qwen_tokenizer, tiny_model
from rank1_hf.prompt import build_prompt
from rank1_hf.engine.readout import readout_ids

WORDS = "cat dog bread oven yeast river mountain law court judge software python compiler vitamin protein".split()

VLLM_SCRIPT = textwrap.dedent(
    """
    import json, sys, time, os
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    spec = json.load(open(sys.argv[1]))
    llm = LLM(spec["model"], dtype="float32", enable_prefix_caching=True, logprobs_mode="processed_logprobs",
              max_model_len=4096, seed=0)
    tok = llm.get_tokenizer()
    think = tok.encode("</think>", add_special_tokens=False)
    t_id, f_id = spec["readout"]
    prompts = spec["prompts"]
    start = time.perf_counter()
    gen = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompt_ids"]],
                       SamplingParams(temperature=0, max_tokens=spec["max_new_tokens"], stop_token_ids=think,
                                      detokenize=True, skip_special_tokens=False), use_tqdm=False)
    reads, outcomes = [], []
    for prompt, ids, out in zip(prompts, spec["prompt_ids"], gen):
        o = out.outputs[0]
        if o.token_ids and o.token_ids[-1] in think:
            reads.append(ids + list(o.token_ids)); outcomes.append("answered")
        else:
            text = o.text.rstrip()
            if not text.endswith((".", "!", "?")):
                cut = max(text.rfind("."), text.rfind("!"), text.rfind("?"))
                if cut != -1:
                    text = text[: cut + 1]
            reads.append(tok(prompt + "\\n" + text.strip() + "\\n</think>")["input_ids"]); outcomes.append("forced")
    outs = llm.generate([TokensPrompt(prompt_token_ids=r) for r in reads],
                        SamplingParams(temperature=0, max_tokens=1, logprobs=2, allowed_token_ids=[t_id, f_id]),
                        use_tqdm=False)
    scores = []
    import math
    for out in outs:
        lp = out.outputs[0].logprobs[-1]
        t, f = lp[t_id].logprob, lp[f_id].logprob
        scores.append(math.exp(t) / (math.exp(t) + math.exp(f)))
    elapsed = time.perf_counter() - start
    json.dump({"seconds": elapsed, "scores": scores, "outcomes": outcomes,
               "generated": [len(o.outputs[0].token_ids) for o in gen]}, open(sys.argv[2], "w"))
    """
)


def make_model(directory: Path, answered: bool) -> None:
    tok = qwen_tokenizer()
    model = tiny_model(tok, "qwen2", layers=4, hidden=512, heads=8, kv_heads=2, intermediate=1024,
                       initializer_range=0.02, seed=0)
    if answered:
        think = tok.encode("</think>", add_special_tokens=False)[0]
        with torch.no_grad():
            model.lm_head.weight[think] *= 160.0
    model.save_pretrained(directory)
    tok.save_pretrained(directory)


def make_pairs(n: int) -> list[tuple[str, str]]:
    import random

    rng = random.Random(0)
    return [(" ".join(rng.choices(WORDS, k=4)), " ".join(rng.choices(WORDS, k=rng.randint(20, 120)))) for _ in range(n)]


def run_rank1_hf(directory: Path, pairs, max_new_tokens: int, batch_size: int):
    ranker = Rank1(str(directory), max_new_tokens=max_new_tokens, batch_size=batch_size, show_progress_bar=False)
    start = time.perf_counter()
    judged = ranker.judge_with_stats(pairs)
    return time.perf_counter() - start, judged.judgements, judged.stats


def run_vllm(python: str, directory: Path, pairs, max_new_tokens: int, tok, readout) -> dict:
    prompts = [build_prompt(q, p) for q, p in pairs]
    spec = {"model": str(directory), "prompts": prompts, "prompt_ids": [tok(p)["input_ids"] for p in prompts],
            "max_new_tokens": max_new_tokens, "readout": list(readout)}
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "spec.json").write_text(json.dumps(spec))
        Path(tmp, "run.py").write_text(VLLM_SCRIPT)
        env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="2")
        subprocess.run([python, str(Path(tmp, "run.py")), str(Path(tmp, "spec.json")), str(Path(tmp, "out.json"))],
                       check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return json.loads(Path(tmp, "out.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON"))
    ap.add_argument("--workloads", default="forced,answered")
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=40)
    args = ap.parse_args()
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| workload | rank1-hf s (runs) | vLLM s | vLLM / rank1-hf | outcomes rank1-hf | outcomes vLLM | "
          "max abs score diff | slot eff | reused tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    for workload in args.workloads.split(","):
        max_new = 64 if workload == "forced" else 100
        pairs = make_pairs(args.pairs)
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp)
            make_model(directory, answered=workload == "answered")
            tok = qwen_tokenizer()
            first, js, stats = run_rank1_hf(directory, pairs, max_new, args.batch_size)
            v = run_vllm(args.vllm_python, directory, pairs, max_new, tok, readout_ids(tok)) if args.vllm_python else None
            second, js2, _ = run_rank1_hf(directory, pairs, max_new, args.batch_size)
        ours = min(first, second)
        count = lambda outcomes: {o: outcomes.count(o) for o in sorted(set(outcomes))}  # noqa: E731
        eff = stats.generated_tokens / max(stats.decode_slots, 1)
        if v is None:
            print(f"| {workload} | {first:.2f} ({first:.2f}, {second:.2f}) | - | - | {count([j.outcome for j in js])} | - | - | "
                  f"{eff:.3f} | {stats.reused_tokens} |")
            continue
        diff = max(abs(j.score - s) for j, s in zip(js, v["scores"]))
        print(f"| {workload} | {ours:.2f} ({first:.2f}, {second:.2f}) | {v['seconds']:.2f} | {v['seconds'] / ours:.2f} | "
              f"{count([j.outcome for j in js])} | {count(v['outcomes'])} | {diff:.1e} | {eff:.3f} | {stats.reused_tokens} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
