"""The continuous engine's scheduling rules, each in a scenario built so that breaking the rule shows:
admission keeps headroom for the rows admitted in the same step, the newest row is the one preempted, a
preempted row resumes where it stopped (also one preempted while reading its readout), out of memory halves
the KV pool, a dropped request leaves nothing behind, and the small-pool warning's threshold.

The tests drive :class:`~rank1_hf.engine.continuous.ContinuousEngine` through its public surface (``step`` with a
``waiting`` deque, ``drop``, ``wants``, ``stats``) on a tiny model with planted reasoning lengths
(tests/plant.py), and compare every judgement with the one-pair-at-a-time reference. One rule (the pool
after out of memory) has no public trace: :func:`pool_tokens` is the only place that reads engine internals.
"""

from __future__ import annotations

import logging
from collections import deque

import pytest
import torch
from plant import plant_lengths
from reference import reference_judge

from rank1_hf.engine.continuous import ContinuousEngine
from rank1_hf.engine.types import Request
from rank1_hf.judging import Judge
from rank1_hf.model.kv_budget import PAGE_SIZE, kv_bytes_per_token
from rank1_hf.options import JudgeOptions
from rank1_hf.prompt import build_prompt
from rank1_hf.testing import qwen_tokenizer, tiny_model

QWEN_EOS = {151643}
CONTEXT = 160  # every prompt + max_new_tokens here fits; a row's capacity is CONTEXT + 64 tokens
MAX_NEW = 40


def pool_tokens(engine: ContinuousEngine) -> int:
    """The tokens the engine's current KV pool holds (scratch page excluded). The one read of engine
    internals in this file: port it when the pool moves (e.g. to a page allocator)."""
    pages = engine.runner.cache.allocator
    return (pages.pages - 1) * pages.page_size


def pair_of_length(tok, n: int) -> tuple[str, str]:
    """A (query, passage) whose rank1 prompt is exactly ``n`` tokens ("cat" is one token per word)."""
    for k in range(1, 400):
        pair = ("q", " ".join(["cat"] * k))
        if len(tok(build_prompt(*pair))["input_ids"]) == n:
            return pair
    raise AssertionError(f"no prompt of {n} tokens")


@pytest.fixture(scope="module")
def tok():
    return qwen_tokenizer()


def planted(tok, reasoning: dict[int, int], never: set[int] = frozenset()):
    """A tiny model that reasons ``reasoning[n]`` tokens for an n-token prompt (``never``: loops, forced at MAX_NEW)."""
    model = tiny_model(tok, "qwen2", seed=0)
    handle = plant_lengths(model, tok, reasoning, never=set(never))
    return model, handle


def engine_for(model, tok, pool: int, batch_size: int) -> ContinuousEngine:
    """A continuous engine whose KV pool holds ``pool`` tokens (``pool`` a multiple of the page size). Rows
    here share most of their prompts; sharing pages is off so that each row's pages are its own, as the
    page counts of these rules assume (tests/test_prefix_pages.py covers sharing)."""
    options = JudgeOptions(max_new_tokens=MAX_NEW, context_size=CONTEXT, batch_size=batch_size,
                           kv_memory=pool * kv_bytes_per_token(model), engine="continuous")
    return ContinuousEngine(model, Judge(model, tok, options).settings, share_prompts=False)


def request(tok, rid: int, pair: tuple[str, str]) -> Request:
    prompt = build_prompt(*pair)
    return Request(rid, tok(prompt)["input_ids"], prompt)


def run(engine: ContinuousEngine, waiting: deque, wanted: int, steps: int = 500) -> list:
    """Step until ``wanted`` rows came out; (request, generation) in the order they finished."""
    out: list = []
    for _ in range(steps):
        out += engine.step(waiting)
        if len(out) >= wanted:
            return out
    raise AssertionError(f"{len(out)} of {wanted} rows finished in {steps} steps")


def assert_reference(model, tok, finished, pairs_by_id):
    """Each finished row's reasoning tokens and readout are the reference's for its pair."""
    for req, gen in finished:
        ref = reference_judge(model, tok, *pairs_by_id[req.id], MAX_NEW, QWEN_EOS)
        assert gen.tokens[: len(ref.tokens)] == ref.tokens, req.id
        t, f = gen.readout
        assert abs(t - ref.true_logit) <= 1e-3 and abs(f - ref.false_logit) <= 1e-3, req.id


# ---- admission ----------------------------------------------------------------------------------------


def test_headroom_counts_the_rows_admitted_in_the_same_step(tok):
    """A pool of 10 pages, prompts of 50 tokens (2 pages with their next token), 8 slots. A row is admitted
    only while half a page per row already admitted stays free: rows 1-4 leave 8, 6, 4, 2 free pages (>= 0,
    0, 1, 1 kept), a fifth would leave 0 with 2 to keep. So the first step decodes 4 rows, not 5."""
    model, handle = planted(tok, {50: 30})
    try:
        engine = engine_for(model, tok, pool=10 * PAGE_SIZE, batch_size=8)
        pair = pair_of_length(tok, 50)
        waiting = deque(request(tok, i, pair) for i in range(8))
        assert engine.step(waiting) == []
        assert engine.stats.peak_rows == 4 and len(waiting) == 4
        assert engine.wants() == 8 - 4  # the free slots: 4 rows in flight
    finally:
        handle.remove()


# ---- preemption ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reading_preempted(tok):
    """Two rows in a pool of 4 pages: A (40-token prompt, never closes </think>, forced at MAX_NEW) is
    admitted first, B (59-token prompt, 5 reasoning tokens) second, 2 pages each. B closes </think> after
    its 5th decode step: its readout step reads position 59 + 5 = 64, the first of a third page, while A
    still holds 2: the pool is one page short exactly when B is READING, and B, the newest, must give way."""
    model, handle = planted(tok, {59: 5}, never={40})
    pairs = {0: pair_of_length(tok, 40), 1: pair_of_length(tok, 59)}
    yield model, pairs
    handle.remove()


def test_the_newest_row_reading_its_readout_is_preempted_and_resumes_reading(tok, reading_preempted):
    """B is preempted while READING and comes back after A finishes: A (forced after 40 tokens) comes out
    before B (5 tokens), B's readout is the reference's (a READING row resumed as DECODING would read after
    one more token), and no token is decoded twice: B's prefill on resumption gives its readout, so the
    decode slots stay within one per generated token."""
    model, pairs = reading_preempted
    engine = engine_for(model, tok, pool=4 * PAGE_SIZE, batch_size=2)
    waiting = deque(request(tok, rid, pair) for rid, pair in pairs.items())
    finished = run(engine, waiting, wanted=2)
    assert engine.stats.preemptions == 1
    assert [req.id for req, _ in finished] == [0, 1]  # B waited: it was the one preempted, not A
    assert_reference(model, tok, finished, pairs)
    a, b = (gen for _, gen in finished)
    assert len(a.tokens) == MAX_NEW and a.think is None and b.think is not None and len(b.tokens) == 6
    # one decode slot per generated token after the first, plus one readout step per answered row, at most
    assert engine.stats.decode_slots <= (len(a.tokens) - 1) + (len(b.tokens) - 1 + 1)


def test_a_dropped_preempted_request_leaves_nothing_behind(tok, reading_preempted):
    """Preempted B goes back to the front of ``waiting``; its caller leaves (removed from the queue and
    dropped). A later request that reuses B's id is a new prompt, judged from scratch: the engine kept
    nothing of B."""
    model, pairs = reading_preempted
    engine = engine_for(model, tok, pool=4 * PAGE_SIZE, batch_size=2)
    waiting = deque(request(tok, rid, pair) for rid, pair in pairs.items())
    for _ in range(20):
        assert engine.step(waiting) == []
        if engine.stats.preemptions:
            break
    assert engine.stats.preemptions == 1 and [r.id for r in waiting] == [1]
    waiting.clear()
    engine.drop({1})
    other = pair_of_length(tok, 59)[0], "Rivers flood in spring."
    fresh = request(tok, 1, other)
    waiting.append(fresh)
    finished = run(engine, waiting, wanted=2)
    assert sorted(req.id for req, _ in finished) == [0, 1]
    assert [req for req, _ in finished if req.id == 1] == [fresh]
    assert_reference(model, tok, finished, {0: pairs[0], 1: other})


# ---- out of memory ------------------------------------------------------------------------------------


def test_out_of_memory_halves_the_rows_and_the_pool(tok):
    """One injected out-of-memory error on the first decode step: the step gives nothing back, the next
    one starts over with half the slots and a pool of half the tokens, and every judgement is the
    reference's."""
    model, handle = planted(tok, {50: 6, 51: 9, 52: 4, 53: 7})
    fired: list[int] = []

    def hook(module, args, kwargs):
        if not fired and kwargs["input_ids"].shape[1] == 1:
            fired.append(kwargs["input_ids"].shape[0])
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    hooked = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        engine = engine_for(model, tok, pool=16 * PAGE_SIZE, batch_size=4)
        pairs = {n - 50: pair_of_length(tok, n) for n in (50, 51, 52, 53)}
        waiting = deque(request(tok, rid, pair) for rid, pair in pairs.items())
        engine.warmup()  # the pool is made now
        assert pool_tokens(engine) == 16 * PAGE_SIZE
        assert engine.step(waiting) == [] and fired == [4]  # 4 rows admitted, prefilled, then out of memory
        assert engine.stats.oom_retries == 1 and engine.scheduler.rows_limit == 2 and len(waiting) == 4
        finished = run(engine, waiting, wanted=4)
        assert pool_tokens(engine) == 8 * PAGE_SIZE
        assert sorted(req.id for req, _ in finished) == [0, 1, 2, 3]
        assert_reference(model, tok, finished, pairs)
    finally:
        hooked.remove()
        handle.remove()


# ---- the small-pool warning ---------------------------------------------------------------------------


def test_the_small_pool_warning_fires_below_one_short_prompt_and_max_new_tokens(tok, caplog):
    """The pool must hold a 512-token prompt and max_new_tokens: exactly that is quiet, one token less warns."""
    model = tiny_model(tok, "qwen2", seed=0)
    per_token = kv_bytes_per_token(model)

    def warned(tokens: int) -> bool:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="rank1_hf"):
            Judge(model, tok, JudgeOptions(max_new_tokens=100, kv_memory=tokens * per_token))
        return any("fewer than a 512-token prompt and max_new_tokens=100" in r.getMessage() for r in caplog.records)

    assert not warned(512 + 100)
    assert warned(512 + 100 - 1)
    assert not warned(4 * (512 + 100))
