"""The KV pool: rows hold the pages they use, the pool (not prompt + max_new_tokens) bounds the rows in
flight, and preempting a row when the pool is full never changes its judgement."""

import pytest
from conftest import FAMILIES, make_pairs
from plant import plant_lengths
from reference import reference_judge

from rank1_hf import Rank1, Rank1Error
from rank1_hf.model.kv_budget import PAGE_SIZE, kv_bytes_per_token
from rank1_hf.options import JudgeOptions
from rank1_hf.prompt import build_prompt
from rank1_hf.testing import tiny_model

EOS = {"qwen": {151643}, "llama": {128009}, "mistral": {2}}  # each tiny model's end-of-sequence id
MAX_NEW = 100
REASONING = [70, 5, 95, 40, 85, 20, 60]  # several pages each, so rows outgrow what they were admitted with


def planted(tok, family, n=10, seed=3):
    model = tiny_model(tok, FAMILIES[family][1], seed=0)
    pairs = make_pairs(n, seed=seed, max_words=30)
    lengths = sorted({len(tok(build_prompt(q, p))["input_ids"]) for q, p in pairs})
    never = {lengths[3]}  # one prompt length never closes </think>: forced at MAX_NEW
    handle = plant_lengths(model, tok, {m: REASONING[k % len(REASONING)] for k, m in enumerate(lengths) if m not in never},
                           never=never)
    return model, pairs, lengths, handle


@pytest.mark.parametrize("family", ["qwen", "llama", "mistral"])
def test_preemption_never_changes_a_judgement(tokenizers, family):
    """A pool two pages over one longest row: rows are admitted while pages are free, outgrow the pool
    and are preempted (at least half as many preemptions as pairs), and every judgement equals the
    one-pair-at-a-time reference."""
    tok = tokenizers[family]
    model, pairs, lengths, handle = planted(tok, family)
    try:
        refs = [reference_judge(model, tok, q, p, MAX_NEW, EOS[family]) for q, p in pairs]
        tokens = max(lengths) + MAX_NEW + 2 * PAGE_SIZE
        ranker = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, batch_size=8, engine="continuous",
                                  kv_memory=tokens * kv_bytes_per_token(model))
        judged = ranker.judge_with_stats(pairs)
        ranker.close()
    finally:
        handle.remove()
    assert judged.stats.preemptions >= len(pairs) // 2
    for j, r in zip(judged.judgements, refs):
        assert (j.outcome, j.reasoning) == (r.outcome, r.reasoning)
        assert abs(j.score - r.score) <= 1e-4
        assert abs(j.true_logit - r.true_logit) <= 1e-3 and abs(j.false_logit - r.false_logit) <= 1e-3


def test_the_pool_not_the_worst_case_bounds_the_rows(tokenizers):
    """With the memory of 2 worst-case rows (prompt + max_new_tokens each), more than 2 rows decode
    together; the generate engine, whose cache reserves the worst case, keeps to 2."""
    tok = tokenizers["qwen"]
    model, pairs, lengths, handle = planted(tok, "qwen", n=12, seed=5)
    memory = 2 * (max(lengths) + MAX_NEW) * kv_bytes_per_token(model)
    try:
        paged = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, batch_size=12, engine="continuous",
                                 kv_memory=memory).judge_with_stats(pairs)
        static = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, batch_size=12, engine="generate",
                                  kv_memory=memory).judge_with_stats(pairs)
    finally:
        handle.remove()
    assert paged.stats.peak_rows > 2
    assert static.stats.peak_rows == 2
    assert [j.reasoning for j in paged.judgements] == [j.reasoning for j in static.judgements]


def test_a_pool_too_small_for_one_prompt_is_a_clear_error(tokenizers):
    tok = tokenizers["qwen"]
    model = tiny_model(tok, "qwen2", seed=0)
    ranker = Rank1.from_model(model, tok, max_new_tokens=8, engine="continuous",
                              kv_memory=PAGE_SIZE * kv_bytes_per_token(model))
    with pytest.raises(Rank1Error, match="kv_memory holds 32 tokens, too few for one row"):
        ranker.judge(make_pairs(1, seed=1))
    ranker.close()


def test_kv_memory_and_the_retired_token_budget():
    assert JudgeOptions(kv_memory="1.5GiB").kv_memory == 3 * 2**29
    assert JudgeOptions(kv_memory="500MB").kv_memory == 500 * 10**6
    assert JudgeOptions(kv_memory=4096).kv_memory == 4096
    for bad in ("12 apples", 0, -5, 2.5, "GiB"):
        with pytest.raises(Rank1Error, match="kv_memory must be"):
            JudgeOptions(kv_memory=bad)
    with pytest.raises(Rank1Error, match="token_budget is retired.*kv_memory"):
        JudgeOptions(token_budget=1000)
