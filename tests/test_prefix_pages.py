"""Shared prompt pages with a model: rows of one query read the query's pages from the row that wrote them
and prefill only their passage, and every judgement stays the one the pair gets alone."""

import random

import pytest
from conftest import FAMILIES, PLANT_FACTOR, WORDS
from plant import plant_lengths, plant_think

from rank1_hf import Rank1
from rank1_hf.engine import continuous as engine_module
from rank1_hf.model.kv_budget import PAGE_SIZE, kv_bytes_per_token
from rank1_hf.prompt import build_prompt
from rank1_hf.testing import tiny_model

MAX_NEW = 12
REASONING = [70, 5, 95, 40, 85, 20, 60]  # several pages each, so rows outgrow what they were admitted with


def three_queries(n=100, seed=0):
    """n passages for each of 3 queries of 40 words (a few full pages each, beyond the template's)."""
    rng = random.Random(seed)
    queries = [" ".join(rng.choices(WORDS, k=40)) for _ in range(3)]
    return [(q, " ".join(rng.choices(WORDS, k=rng.randint(3, 30)))) for q in queries for _ in range(n)]


def planted(tokenizers, family):
    tok = tokenizers[family]
    model = tiny_model(tok, FAMILIES[family][1], seed=0)
    plant_think(model, tok, PLANT_FACTOR[family])
    return model, tok


class Engines:
    """Every ContinuousEngine made while it is installed."""

    def __init__(self, monkeypatch):
        self.made = []
        real = engine_module.ContinuousEngine.__init__

        def spy(engine, *args, **kwargs):
            self.made.append(engine)
            real(engine, *args, **kwargs)

        monkeypatch.setattr(engine_module.ContinuousEngine, "__init__", spy)

    def assert_pages_all_free(self):
        for engine in self.made:
            pages = engine.scheduler.pages
            if pages is not None:
                assert not engine.rows and all(r == 0 for r in pages.refs)
                assert sorted(pages.free) == list(range(1, pages.pages))


def assert_same(judged, alone):
    for j, a in zip(judged, alone):
        assert (j.outcome, j.reasoning, j.reasoning_tokens) == (a.outcome, a.reasoning, a.reasoning_tokens)
        assert abs(j.score - a.score) <= 1e-4, (j, a)


@pytest.mark.parametrize("family", ["qwen", "llama", "mistral"])
def test_shared_prompt_pages_judge_as_each_pair_alone(tokenizers, family, monkeypatch):
    """100 passages of 3 queries: most prompt tokens come from shared pages, and every judgement equals
    the pair judged alone (one row in the pool, nothing to share)."""
    model, tok = planted(tokenizers, family)
    pairs = three_queries()
    engines = Engines(monkeypatch)
    with Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, batch_size=16, engine="continuous") as ranker:
        judged = ranker.judge_with_stats(pairs)
        engines.assert_pages_all_free()
    with Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, batch_size=1, engine="continuous") as ranker:
        alone = ranker.judge_with_stats(pairs)
    assert alone.stats.prefill_tokens_shared == 0
    assert {j.outcome for j in alone.judgements} == {"answered", "forced"}
    assert len({j.reasoning_tokens for j in alone.judgements}) >= 4
    assert_same(judged.judgements, alone.judgements)
    stats = judged.stats
    # the first row of each query (and of each preemption-free stretch) writes it; the others read it
    assert stats.prefill_tokens_shared > 2 * stats.prefill_tokens
    assert stats.prefill_tokens < alone.stats.prefill_tokens / 2  # padding included


def test_preempted_rows_keep_shared_pages_counted(tokenizers, monkeypatch):
    """A pool two pages over one longest row, rows reasoning for several pages: rows holding a query's pages
    are preempted and readmitted again and again; judgements stay the pair's alone, and after every call
    every page is back in the free list."""
    tok = tokenizers["qwen"]
    model = tiny_model(tok, "qwen2", seed=0)
    pairs = three_queries(n=12, seed=1)
    lengths = sorted({len(tok(build_prompt(q, p))["input_ids"]) for q, p in pairs})
    handle = plant_lengths(model, tok, {m: REASONING[k % len(REASONING)] for k, m in enumerate(lengths)})
    engines = Engines(monkeypatch)
    try:
        tokens = max(lengths) + 100 + 2 * PAGE_SIZE
        ranker = Rank1.from_model(model, tok, max_new_tokens=100, batch_size=12, engine="continuous",
                                  kv_memory=tokens * kv_bytes_per_token(model))
        judged = [ranker.judge_with_stats(pairs[k::2]) for k in range(2)]
        engines.assert_pages_all_free()
        ranker.close()
        with Rank1.from_model(model, tok, max_new_tokens=100, batch_size=1, engine="continuous") as alone:
            refs = alone.judge(pairs)
    finally:
        handle.remove()
    assert sum(j.stats.preemptions for j in judged) >= len(pairs) // 4
    assert sum(j.stats.prefill_tokens_shared for j in judged) > 0
    assert_same(judged[0].judgements + judged[1].judgements, refs[0::2] + refs[1::2])


def test_a_closing_pass_never_writes_a_shared_page(tokenizers, monkeypatch):
    """A closing sequence that parts from the row's cache inside its shared pages (here: its first token
    replaced) is read by a full pass of its own, never written over the pages other rows still read."""
    model, tok = planted(tokenizers, "qwen")
    pairs = three_queries(n=16, seed=2)
    real = engine_module.closing_ids

    def parted(tokenizer, request, tokens, think):
        sequence = real(tokenizer, request, tokens, think)
        return [sequence[1]] + sequence[1:]

    monkeypatch.setattr(engine_module, "closing_ids", parted)
    with Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, batch_size=16, engine="continuous") as ranker:
        judged = ranker.judge_with_stats(pairs)
    with Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, batch_size=1, engine="continuous") as ranker:
        alone = ranker.judge(pairs)
    assert judged.stats.prefill_tokens_shared > 0 and {j.outcome for j in alone} == {"answered", "forced"}
    assert_same(judged.judgements, alone)
