"""An independent, deliberately slow rank1 reference for the tests.

One pair at a time, no KV cache (every step re-reads the whole sequence), float32 logits, a plain argmax
loop, and the rank1 rules written out again from the official code (orionw/rank1) rather than imported from the package.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

HEAD = "Determine if the following passage is relevant to the query. Answer only with 'true' or 'false'.\nQuery: "


@dataclass
class Ref:
    score: float
    outcome: str
    reasoning: str
    tokens: list[int]
    true_logit: float
    false_logit: float
    prompt_tokens: int


@torch.inference_mode()
def _next_logits(model, ids: list[int]) -> torch.Tensor:
    # Only the last position is needed; the whole sequence is still re-read at every step.
    return model(input_ids=torch.tensor([ids]), use_cache=False, logits_to_keep=1).logits[0, -1].float()


def reference_judge(model, tokenizer, query: str, passage: str, max_new_tokens: int, eos_ids: set[int]) -> Ref:
    prompt = HEAD + query + "\nPassage: " + passage + "\n<think>"
    ids = tokenizer(prompt)["input_ids"]
    t_id = tokenizer(" true", add_special_tokens=False)["input_ids"][0]
    f_id = tokenizer(" false", add_special_tokens=False)["input_ids"][0]
    gen: list[int] = []
    while len(gen) < max_new_tokens:
        nxt = int(_next_logits(model, ids + gen).argmax())
        if nxt in eos_ids:
            break
        gen.append(nxt)
        text = tokenizer.decode(gen, skip_special_tokens=False)
        if "</think>" in text:
            end = text.index("</think>") + len("</think>")
            if end == len(text):
                seq = ids + gen
            else:  # </think> ends inside the last token: read right after its own text
                before = tokenizer.decode(gen[:-1], skip_special_tokens=False)
                seq = ids + gen[:-1] + tokenizer(text[len(before) : end], add_special_tokens=False)["input_ids"]
            logits = _next_logits(model, seq)
            return _ref(logits, t_id, f_id, "answered", text[: end - len("</think>")], gen, len(ids))
    text = tokenizer.decode(gen, skip_special_tokens=False)
    cut = text.strip()
    if cut and cut[-1] not in ".!?":
        last = max(cut.rfind(c) for c in ".!?")
        if last >= 0:
            cut = cut[: last + 1]
    forced = prompt + "\n" + cut.strip() + "\n</think>"
    logits = _next_logits(model, tokenizer(forced)["input_ids"])
    return _ref(logits, t_id, f_id, "forced", text, gen, len(ids))


def _ref(logits, t_id, f_id, outcome, reasoning, gen, prompt_tokens) -> Ref:
    t, f = float(logits[t_id]), float(logits[f_id])
    p_true = math.exp(t) / (math.exp(t) + math.exp(f)) if max(t, f) < 700 else float(t > f)
    return Ref(p_true, outcome, reasoning, list(gen), t, f, prompt_tokens)
