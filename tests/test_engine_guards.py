"""Engine guards through the public API (Rank1.judge_with_stats / judge_iter and EngineStats): repeated
out of memory halves the rows until they fit, a row finished in the step that ran out of memory is still
delivered (once), and closing passes reuse the prefix they share with the row's cache."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import make_pairs
from plant import logit_positions, plant_lengths
from reference import reference_judge

from rank1_hf import Rank1
from rank1_hf.prompt import build_prompt
from rank1_hf.testing import tiny_model

QWEN_EOS = 151643  # <|endoftext|>
QWEN_THINK_END = 151666  # </think> in the rank1-style Qwen tokenizer
MAX_NEW = 24
REASONING = [3, 15, 7, 11, 5, 9]


def prompt_tokens(tok, query: str, passage: str) -> int:
    return len(tok(build_prompt(query, passage))["input_ids"])


def plant_eos(model, tok, lengths: set[int]):
    """A prompt of n tokens, n in ``lengths``, is answered with EOS at once (before any reasoning)."""
    last_prompt_token = tok("x\n<think>", add_special_tokens=False)["input_ids"][-1]
    wanted = torch.tensor(sorted(n - 1 for n in lengths))

    def hook(module, args, kwargs, output):
        ids, logits = kwargs["input_ids"], output.logits
        k, width = logits.shape[1], ids.shape[1]
        positions = logit_positions(kwargs, ids.shape[0], k, width)
        hit = (ids[:, width - k:] == last_prompt_token) & torch.isin(positions, wanted)
        logits[..., QWEN_EOS] += hit.to(logits.dtype) * 1000.0
        return output

    return model.register_forward_hook(hook, with_kwargs=True)


@pytest.fixture(scope="module")
def planted(tokenizers):
    """16 pairs: most reason for a planted length then close </think>; two prompt lengths never close
    (forced at MAX_NEW, read by a closing pass); two answer EOS at once (read by a closing pass right
    after their prefill)."""
    tok = tokenizers["qwen"]
    model = tiny_model(tok, "qwen2", seed=1)
    pairs = make_pairs(16, seed=5)
    lengths = sorted({prompt_tokens(tok, q, p) for q, p in pairs})
    never, eos = set(lengths[2::6]), set(lengths[1::6])
    reasoning = {n: REASONING[k % len(REASONING)] for k, n in enumerate(lengths) if n not in never | eos}
    handles = [plant_lengths(model, tok, reasoning, never=never), plant_eos(model, tok, eos)]
    refs = [reference_judge(model, tok, q, p, MAX_NEW, {QWEN_EOS}) for q, p in pairs]
    yield model, tok, pairs, never, eos, refs
    for handle in handles:
        handle.remove()


def assert_same(judgements, refs):
    for j, r in zip(judgements, refs):
        assert (j.outcome, j.reasoning) == (r.outcome, r.reasoning)
        assert abs(j.true_logit - r.true_logit) <= 1e-3 and abs(j.false_logit - r.false_logit) <= 1e-3


def test_the_planted_pairs_cover_every_path(planted):
    model, tok, pairs, never, eos, refs = planted
    n = [prompt_tokens(tok, q, p) for q, p in pairs]
    assert any(k in eos for k in n) and any(k in never for k in n) and sum(k not in never | eos for k in n) >= 8
    assert {r.outcome for r in refs} >= {"answered", "forced"}
    assert all(r.reasoning == "" for k, r in zip(n, refs) if k in eos)


@pytest.mark.parametrize("engine", ["continuous", "generate"])
def test_repeated_out_of_memory_halves_the_rows_until_they_fit(planted, engine):
    """Every model call with more than 2 rows runs out of memory. Each retry must halve the rows in flight
    (8 -> 4 -> 2), so the job ends, with every pair judged as the reference judges it; a retry that kept
    the row count would run out of memory forever (cut short here after 20 errors)."""
    model, tok, pairs, _, _, refs = planted
    errors: list[int] = []

    def hook(module, args, kwargs):
        rows = kwargs["input_ids"].shape[0]
        if rows > 2:
            errors.append(rows)
            if len(errors) > 20:
                raise RuntimeError("injected: the retries never end")
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        ranker = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, engine=engine, batch_size=8)
        judged = ranker.judge_with_stats(pairs)
    finally:
        handle.remove()
    assert_same(judged.judgements, refs)
    stats = judged.stats
    assert stats.oom_retries == len(errors) and 2 <= len(errors) <= 3, errors
    assert stats.peak_rows <= 2  # rows_limit halved to 2 (the scheduler's rule: tests/test_scheduler.py)
    assert max(errors) == 8 and min(errors) in (3, 4)  # the first retry had 8 rows, the last 4 (or 3)


def test_a_row_finished_in_the_step_that_ran_out_of_memory_is_delivered_once(planted):
    """Rows answered with EOS at once are read by a closing pass right after their prefill, before the
    decode step of the same engine iteration; that decode step runs out of memory. The rows already read
    must still come out (exactly once), like every other pair, equal to the reference."""
    model, tok, pairs, _, eos, refs = planted
    calls: list[tuple[int, bool]] = []  # (input width, holds </think>) per model call
    fired: list[int] = []
    yielded: list[int] = []

    def hook(module, args, kwargs):
        ids = kwargs["input_ids"]
        calls.append((ids.shape[1], bool((ids == QWEN_THINK_END).any())))
        after_eos_close = (len(calls) >= 3 and calls[-1][0] == 1 and calls[-2][0] > 1 and calls[-2][1]
                           and calls[-3][0] > 1 and not calls[-3][1])
        if not fired and after_eos_close:
            fired.append(len(yielded))
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        ranker = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, engine="continuous", batch_size=4)
        got = {}
        judging = ranker.judge_iter(pairs)
        for i, j in judging:
            yielded.append(i)
            got[i] = j
    finally:
        handle.remove()
    assert fired, "no decode step followed a closing pass right after a prefill"
    assert sorted(Counter(yielded).items()) == [(i, 1) for i in range(len(pairs))]
    assert judging.stats.oom_retries == 1
    assert_same([got[i] for i in range(len(pairs))], refs)


def test_closing_passes_reuse_the_prefix_they_share_with_the_cache(planted):
    """A forced row's closing sequence (prompt, then "\\n" + its cut reasoning + "\\n</think>") starts
    with the prompt its cache already holds: that prefix is served from the cache, not run again."""
    model, tok, pairs, never, eos, refs = planted
    ranker = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, engine="continuous", batch_size=4)
    judged = ranker.judge_with_stats(pairs)
    assert_same(judged.judgements, refs)
    closed = [prompt_tokens(tok, q, p) for q, p in pairs if prompt_tokens(tok, q, p) in never | eos]
    assert closed
    stats = judged.stats
    assert stats.reused_tokens >= sum(closed)
    # what was run for the readouts is small next to the prompts: at most the closing tokens and the
    # reasoning re-tokenized, plus one step per answered row
    assert stats.readout_tokens < sum(closed)
