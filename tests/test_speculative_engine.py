"""Speculative decoding by prompt lookup in the continuous engine: every judgement equals plain decoding's
(same reasoning tokens, same outcome, scores within 1e-4), whether drafts fail (random models) or are
accepted (a model that quotes its passage), at one row and many, when ``</think>`` closes or
``max_new_tokens`` is reached inside an accepted run, under preemption and with several callers."""

import random
import threading

import pytest
from conftest import FAMILIES, PLANT_FACTOR, WORDS, make_pairs
from plant import plant_quoting, plant_think

from rank1_hf import Rank1
from rank1_hf.engine import speculation
from rank1_hf.engine.scheduler import RowState, Scheduler
from rank1_hf.model.kv_budget import PAGE_SIZE, kv_bytes_per_token
from rank1_hf.testing import tiny_model

QUOTED = WORDS[:12]  # what the quoting model writes before </think>


def judge(model, tok, pairs, speculate, **options):
    with Rank1.from_model(model, tok, engine="continuous", speculate=speculate, **options) as ranker:
        return ranker.judge_with_stats(pairs)


def assert_same(got, plain):
    assert [(j.outcome, j.reasoning, j.reasoning_tokens) for j in got] == [
        (j.outcome, j.reasoning, j.reasoning_tokens) for j in plain]
    assert max(abs(a.score - b.score) for a, b in zip(got, plain)) <= 1e-4


class Runs:
    """How each verified run ended: (row state after it, drafts kept), recorded from Scheduler.accept."""

    def __init__(self, monkeypatch):
        self.ends: list[tuple[RowState, int]] = []
        real = Scheduler.accept

        def spy(scheduler, row, inputs, picked):
            kept = real(scheduler, row, inputs, picked)
            self.ends.append((row.state, kept))
            return kept

        monkeypatch.setattr(Scheduler, "accept", spy)

    def inside(self, state: RowState) -> bool:
        """A run that kept drafts ended with the row in ``state``."""
        return any(s is state and kept > 0 for s, kept in self.ends)


def quoting_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Passages that quote the planted reasoning whole, in part, or not at all, among random words."""
    rng = random.Random(seed)
    pairs = []
    for k in range(n):
        words = rng.choices(WORDS, k=rng.randint(3, 20))
        if k % 3 == 0:
            words += QUOTED[:-1] + [QUOTED[-1] + "</think> true"]
        elif k % 3 == 1:
            start = rng.randint(0, 6)
            words += QUOTED[start : start + rng.randint(2, 6)] + rng.choices(WORDS, k=3)
        pairs.append((" ".join(rng.choices(WORDS, k=3)), " ".join(words)))
    return pairs


@pytest.mark.parametrize("family", ["qwen", "llama", "mistral"])
def test_rejected_drafts_leave_nothing_behind(tokenizers, family):
    """Drafts that fail: a model that quotes words its passages hold in another order (each word's
    successor is proposed and rejected), and a random model; many rows and one row judge as plain decoding."""
    tok = tokenizers[family]
    model = tiny_model(tok, FAMILIES[family][1], seed=0)
    rng = random.Random(1)
    shuffled = [(" ".join(rng.choices(WORDS, k=3)), " ".join(rng.sample(QUOTED, k=12) + rng.choices(WORDS, k=rng.randint(0, 30))))
                for _ in range(16)]
    handle = plant_quoting(model, tok, QUOTED)
    try:
        plain = judge(model, tok, shuffled, "off", max_new_tokens=24, batch_size=8)
        many = judge(model, tok, shuffled, "prompt-lookup", max_new_tokens=24, batch_size=8)
        one = judge(model, tok, shuffled[:4], "prompt-lookup", max_new_tokens=24, batch_size=1)
    finally:
        handle.remove()
    assert many.stats.draft_tokens > 2 * many.stats.accepted_tokens > 0
    assert_same(many.judgements, plain.judgements)
    assert_same(one.judgements, plain.judgements[:4])

    handle = plant_think(model, tok, PLANT_FACTOR[family])
    pairs = make_pairs(24, seed=3)
    try:
        plain = judge(model, tok, pairs, "off", max_new_tokens=24, batch_size=8)
        many = judge(model, tok, pairs, "prompt-lookup", max_new_tokens=24, batch_size=8)
    finally:
        if handle is not None:
            handle.remove()
    assert {j.outcome for j in plain.judgements} == {"answered", "forced"}
    assert_same(many.judgements, plain.judgements)


@pytest.mark.parametrize("family", ["qwen", "qwen-plain", "llama", "mistral"])
def test_accepted_drafts_judge_as_plain_decoding(tokenizers, family, monkeypatch):
    """A model that quotes its passage: drafts are accepted, </think> closes inside accepted runs (its readout
    from the same call; for qwen-plain it ends inside a token, ">\\n") and max_new_tokens cuts inside
    them, and every judgement, at one row and at eight, equals plain decoding's in fewer steps. (A step
    budget that lets eight rows draft 8 tokens each, so that runs reach past </think>.)"""
    monkeypatch.setattr(speculation, "STEP_BUDGET", 64)
    tok = tokenizers[family]
    model = tiny_model(tok, FAMILIES[family][1], seed=0)
    tail = ">\n" if family == "qwen-plain" else None
    handle = plant_quoting(model, tok, QUOTED, tail=tail)
    pairs = quoting_pairs(18)
    runs = Runs(monkeypatch)
    try:
        for max_new, ending in ((40, RowState.DONE if tail is None else RowState.CLOSING), (9, RowState.CLOSING)):
            runs.ends.clear()
            plain = judge(model, tok, pairs, "off", max_new_tokens=max_new, batch_size=8)
            many = judge(model, tok, pairs, "prompt-lookup", max_new_tokens=max_new, batch_size=8)
            assert runs.inside(ending)
            one = judge(model, tok, pairs[:4], "prompt-lookup", max_new_tokens=max_new, batch_size=1)
            assert_same(many.judgements, plain.judgements)
            assert_same(one.judgements, plain.judgements[:4])
            assert many.stats.accepted_tokens >= 3 * len(pairs[::3])
            assert many.stats.steps < plain.stats.steps
            assert {j.outcome for j in plain.judgements} == ({"answered"} if max_new == 40 else {"forced"})
    finally:
        handle.remove()


def test_preempted_rows_judge_as_plain_decoding(tokenizers):
    """A pool a few pages over one row: rows are preempted and prefilled again, drafts and all."""
    tok = tokenizers["qwen"]
    model = tiny_model(tok, "qwen2", seed=0)
    handle = plant_quoting(model, tok, QUOTED)
    pairs = quoting_pairs(16, seed=5)
    longest = max(len(Rank1.from_model(model, tok, engine="continuous").prepare(q, p).ids) for q, p in pairs)
    memory = (longest + 40 + 2 * PAGE_SIZE) * kv_bytes_per_token(model)
    try:
        plain = judge(model, tok, pairs, "off", max_new_tokens=40, batch_size=8, kv_memory=memory)
        spec = judge(model, tok, pairs, "prompt-lookup", max_new_tokens=40, batch_size=8, kv_memory=memory)
    finally:
        handle.remove()
    assert spec.stats.preemptions > 0 and spec.stats.accepted_tokens > 0
    assert_same(spec.judgements, plain.judgements)


def test_shared_callers_judge_as_plain_decoding(tokenizers):
    """Several threads on one speculating ranker each get the judgements plain decoding gives their pairs."""
    tok = tokenizers["qwen"]
    model = tiny_model(tok, "qwen2", seed=0)
    handle = plant_quoting(model, tok, QUOTED)
    pairs = quoting_pairs(24, seed=7)
    chunks = [pairs[k::4] for k in range(4)]
    got: dict[int, list] = {}
    try:
        plain = judge(model, tok, pairs, "off", max_new_tokens=40, batch_size=8)
        with Rank1.from_model(model, tok, engine="continuous", speculate="prompt-lookup", max_new_tokens=40,
                              batch_size=8) as ranker:
            threads = [threading.Thread(target=lambda k=k: got.__setitem__(k, ranker.judge(chunks[k])), daemon=True)
                       for k in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=300)
    finally:
        handle.remove()
    assert sorted(got) == [0, 1, 2, 3]
    for k in range(4):
        assert_same(got[k], plain.judgements[k::4])
