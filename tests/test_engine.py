"""The engine contract, through Rank1 and EngineStats: rows join while others decode, readouts come
without re-reading, out of memory anywhere (prefill, the Nth decode step, the closing pass) loses and
repeats nothing, and the token budget bounds the rows in flight."""

from collections import Counter

import pytest
import torch
from conftest import make_pairs
from plant import plant_lengths
from reference import reference_judge

from rank1_hf import Rank1
from rank1_hf.testing import tiny_model
from rank1_hf.prompt import build_prompt

QWEN_EOS = {151643}  # Qwen2.5's <|endoftext|>, the tiny model's only end-of-sequence id
QWEN_THINK_END = 151666  # "</think>" in the offline rank1-style Qwen tokenizer (an added token)
MAX_NEW = 36
REASONING = [3, 30, 7, 22, 12, 5, 18, 14]  # planted reasoning lengths, by prompt length


@pytest.fixture(scope="module")
def planted(tokenizers):
    """A tiny model that reasons for a planted, widely varied number of tokens per prompt length; two
    prompt lengths loop without ever closing </think> (forced at MAX_NEW)."""
    tok = tokenizers["qwen"]
    assert tok.eos_token_id in QWEN_EOS and tok.convert_tokens_to_ids("</think>") == QWEN_THINK_END
    model = tiny_model(tok, "qwen2", seed=0)
    pairs = make_pairs(16, seed=11)
    lengths = sorted({prompt_tokens(tok, q, p) for q, p in pairs})
    never = set(lengths[1::5])
    reasoning = {n: REASONING[k % len(REASONING)] for k, n in enumerate(lengths) if n not in never}
    handle = plant_lengths(model, tok, reasoning, never=never)
    refs = [reference_judge(model, tok, q, p, MAX_NEW, QWEN_EOS) for q, p in pairs]
    yield model, tok, pairs, reasoning, refs
    handle.remove()


def prompt_tokens(tok, query: str, passage: str) -> int:
    return len(tok(build_prompt(query, passage))["input_ids"])


def assert_same(judgements, refs):
    for j, r in zip(judgements, refs):
        assert (j.outcome, j.reasoning) == (r.outcome, r.reasoning)
        assert abs(j.true_logit - r.true_logit) <= 1e-3 and abs(j.false_logit - r.false_logit) <= 1e-3


class Calls:
    """Records (rows, input width) of every model call; optionally raises out of memory on a chosen one."""

    def __init__(self, model, fail=None):
        self.calls: list[tuple[int, int]] = []
        self.fail, self.fired_after = fail, None
        self.yielded: list[int] = []  # filled by the test while it iterates
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        ids = kwargs["input_ids"]
        self.calls.append(tuple(ids.shape))
        if self.fired_after is None and self.fail is not None and self.fail(self, ids):
            self.fired_after = len(self.yielded)
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    def decode_steps(self) -> int:
        return sum(width == 1 for _, width in self.calls)


def test_planted_lengths_and_free_readout(planted):
    model, tok, pairs, reasoning, refs = planted
    # Plain decode steps (one token per row per step) are what this counts.
    ranker = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, engine="continuous", batch_size=4, speculate="off")
    judged = ranker.judge_with_stats(pairs)
    js = judged.judgements
    assert_same(js, refs)
    answered = [prompt_tokens(tok, q, p) for (q, p), j in zip(pairs, js) if j.outcome == "answered"]
    assert len(answered) >= 10 and len(answered) < len(pairs)
    for (q, p), j in zip(pairs, js):
        n = prompt_tokens(tok, q, p)
        assert j.reasoning_tokens == (reasoning[n] if n in reasoning else MAX_NEW)
    stats = judged.stats
    # One decode step reads each answered row's readout: r reasoning tokens + </think> (the first of
    # them from the prefill) take r decode steps, the readout one more. A forced row decodes its
    # MAX_NEW tokens in MAX_NEW - 1 steps and is read by its closing pass.
    expected = sum(reasoning[n] + 1 for n in answered) + (len(pairs) - len(answered)) * (MAX_NEW - 1)
    assert stats.decode_slots == expected
    assert stats.generated_tokens == sum(reasoning[n] + 1 for n in answered) + (len(pairs) - len(answered)) * MAX_NEW


def test_rows_join_while_others_are_decoding(planted):
    """A prompt is prefilled while other rows are mid-decode, and decodes with them in the next step."""
    model, tok, pairs, _, refs = planted
    calls = Calls(model)
    try:
        ranker = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, engine="continuous", batch_size=4,
                                  speculate="off")  # decode steps of width 1
        judged = ranker.judge_with_stats(pairs)
    finally:
        calls.handle.remove()
    assert_same(judged.judgements, refs)
    trace = calls.calls
    joins = [
        k for k in range(1, len(trace) - 1)
        if trace[k][1] > 1 and trace[k - 1][1] == 1 and trace[k + 1][1] == 1 and trace[k + 1][0] > trace[k][0]
    ]
    # 16 pairs through 4 slots: after the first 4, each of the 12 later admissions fills a slot freed
    # while the other rows still decode (the planted lengths never end 4 rows in one step here).
    assert len(joins) >= 8, trace
    assert judged.stats.steps == calls.decode_steps()
    assert judged.stats.peak_rows == 4


def judge_failing_once(planted, engine, fail, speculate="off"):
    """Judge the planted pairs with out-of-memory injected where ``fail`` says; every pair must come out
    exactly once, equal to the reference, after exactly one retry. Returns the call trace."""
    model, tok, pairs, _, refs = planted
    calls = Calls(model, fail=fail)
    try:
        ranker = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, engine=engine, batch_size=4, speculate=speculate)
        got = {}
        judging = ranker.judge_iter(pairs)
        for i, j in judging:
            calls.yielded.append(i)
            got[i] = j
    finally:
        calls.handle.remove()
    assert sorted(Counter(calls.yielded).items()) == [(i, 1) for i in range(len(pairs))]
    assert judging.stats.oom_retries == 1
    assert_same([got[i] for i in range(len(pairs))], refs)
    return calls


@pytest.mark.parametrize("engine, step", [("continuous", 9), ("continuous", 30), ("generate", 9)])
def test_out_of_memory_on_a_decode_step_loses_and_repeats_nothing(planted, engine, step):
    """Out of memory on the Nth decode step: rows already yielded stay yielded, rows half-decoded or
    finishing in that step are restarted, and every pair comes out exactly once, as the reference."""
    calls = judge_failing_once(planted, engine, lambda c, ids: ids.shape[1] == 1 and c.decode_steps() == step)
    assert calls.fired_after is not None, "the injected error never fired"
    if engine == "continuous" and step == 30:
        assert calls.fired_after >= 1  # some rows were yielded before the error, and not again after


def test_out_of_memory_on_a_verification_step_loses_and_repeats_nothing(planted, monkeypatch):
    """The same on the 5th step that verifies drafts (speculation): nothing lost, nothing twice."""
    from rank1_hf.engine.runner import ModelRunner

    verify, seen = ModelRunner.verify, []

    def failing(self, inputs, cached):
        seen.append(len(inputs))
        if len(seen) == 5:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return verify(self, inputs, cached)

    monkeypatch.setattr(ModelRunner, "verify", failing)
    judge_failing_once(planted, "continuous", lambda c, ids: False, speculate="prompt-lookup")
    assert len(seen) > 5


@pytest.mark.parametrize("engine", ["continuous", "generate"])
def test_out_of_memory_in_the_closing_pass_loses_and_repeats_nothing(planted, engine):
    """The pass that reads unfinished rows after "\\n</think>" runs out of memory: they are redone."""

    def closing(c, ids):  # </think> as input is only ever in a closing pass: the loop rows never write it
        return ids.shape[1] > 1 and bool((ids == QWEN_THINK_END).any())

    calls = judge_failing_once(planted, engine, closing)
    assert calls.fired_after is not None, "no closing pass ran"


def test_static_engine_pays_for_the_longest_row_continuous_does_not(planted):
    model, tok, pairs, _, refs = planted
    static = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, engine="generate", batch_size=8)
    cont = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, engine="continuous", batch_size=8)
    judged_static, judged_cont = static.judge_with_stats(pairs), cont.judge_with_stats(pairs)
    assert_same(judged_static.judgements, refs)
    assert_same(judged_cont.judgements, refs)
    eff_static = judged_static.stats.generated_tokens / judged_static.stats.decode_slots
    eff_cont = judged_cont.stats.generated_tokens / judged_cont.stats.decode_slots
    assert eff_cont >= 0.9 and eff_static < 0.7


def test_kv_memory_limits_generate_batches_to_exactly_three(planted):
    """model.generate reserves prompt + max_new_tokens per row: kv_memory bounds its batches by that sum
    (the continuous engine's pages are tests/test_kv_pool.py's)."""
    from rank1_hf.model.kv_budget import kv_bytes_per_token

    model, tok, pairs, _, refs = planted
    by_length = sorted(range(len(pairs)), key=lambda i: prompt_tokens(tok, *pairs[i]))[-7:]
    lengths = [prompt_tokens(tok, *pairs[i]) for i in by_length]
    budget = 3 * (max(lengths) + MAX_NEW)
    # Any 3 of these rows fit the budget and no 4 do, so 3 rows in flight is the right peak.
    assert 4 * (min(lengths) + MAX_NEW) > budget
    ranker = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, batch_size=32, engine="generate",
                              kv_memory=budget * kv_bytes_per_token(model))
    judged = ranker.judge_with_stats([pairs[i] for i in by_length])
    assert_same(judged.judgements, [refs[i] for i in by_length])
    assert judged.stats.peak_rows == 3


def test_greedy_tokens_is_argmax_exactly():
    """The CPU fast path must pick what torch.argmax picks: first index on ties, NaN wins, any width."""
    from rank1_hf.engine.head import greedy_tokens

    torch.manual_seed(0)
    cases = [torch.randn(5, 151665), torch.randn(3, 100), torch.randn(2, 4096), torch.randn(1, 2049)]
    cases.append(torch.randint(0, 3, (16, 10001)).float())  # many ties, across block edges
    edge = torch.zeros(6, 5000)
    edge[1, 4999] = float("inf")
    edge[2, 7] = float("nan")
    edge[2, 3000] = float("nan")
    edge[3, 2047] = edge[3, 2048] = 1.0  # tie across a block edge: the first wins
    edge[4] = float("-inf")
    edge[5, 4096:] = 2.0  # the max only in the last, partial block
    cases.append(edge)
    cases.append(torch.randn(4, 300).to(torch.bfloat16).float())
    for logits in cases:
        assert torch.equal(greedy_tokens(logits), logits.argmax(-1))
        assert torch.equal(greedy_tokens(logits, block=64), logits.argmax(-1))


def test_engine_choice_follows_the_cache(tokenizers):
    """auto takes the continuous engine only over a plain full-attention cache; forcing it elsewhere is an error."""
    from rank1_hf import Rank1Error

    tok = tokenizers["mistral"]
    windowed = tiny_model(tok, "mistral", sliding_window=16)
    assert Rank1.from_model(windowed, tok, max_new_tokens=8).core.kind == "generate"
    with pytest.raises(Rank1Error, match="plain full-attention KV cache"):
        Rank1.from_model(windowed, tok, max_new_tokens=8, engine="continuous")
    plain = tiny_model(tok, "mistral")
    assert Rank1.from_model(plain, tok, max_new_tokens=8).core.kind == "continuous"
    assert Rank1.from_model(plain, tok, max_new_tokens=8, engine="generate").core.kind == "generate"


def test_a_calls_batch_size_is_its_share_of_the_engine(planted):
    """A per-call batch_size is never dropped: at most that many of the call's pairs are in the engine at
    once (every model call has at most that many rows), sync, async and streamed, with the same judgements."""
    import asyncio

    model, tok, pairs, _, refs = planted
    with Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, engine="continuous", batch_size=8) as ranker:
        calls = Calls(model)
        try:
            judged = ranker.judge_with_stats(pairs, batch_size=3)
            rows_sync = max(rows for rows, _ in calls.calls)
            calls.calls.clear()
            async_judged = asyncio.run(ranker.ajudge_with_stats(pairs, batch_size=2))
            rows_async = max(rows for rows, _ in calls.calls)
            calls.calls.clear()
            streamed = dict(ranker.judge_iter(iter(pairs), batch_size=2))
            rows_streamed = max(rows for rows, _ in calls.calls)
            calls.calls.clear()
            ranker.judge(pairs)
            rows_free = max(rows for rows, _ in calls.calls)
        finally:
            calls.handle.remove()
    assert (rows_sync, rows_async, rows_streamed) == (3, 2, 2) and rows_free > 3
    assert judged.stats.peak_rows == 3 and async_judged.stats.peak_rows == 2
    assert_same(judged.judgements, refs)
    assert_same(async_judged.judgements, refs)
    assert_same([streamed[i] for i in range(len(pairs))], refs)
