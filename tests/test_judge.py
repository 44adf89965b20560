"""Batched judge() against the independent slow reference, for every rank1 model family."""

import random

import numpy as np
import pytest
import torch
from conftest import FAMILIES, PLANT_FACTOR, WORDS, make_pairs
from plant import boost_rows, plant_think
from reference import reference_judge

from rank1_hf import Rank1, Rank1Error
from rank1_hf.offline import tiny_model
from rank1_hf.prompt import THINK_END
from rank1_hf.stopping import ThinkDetector

MAX_NEW = 40


def planted(tokenizers, family, seed=0, factor=None, tail=None):
    tok = tokenizers[family]
    model = tiny_model(tok, FAMILIES[family][1], seed=seed)
    plant_think(model, tok, PLANT_FACTOR[family] if factor is None else factor, tail=tail)
    return model, tok


def eos_ids(model, tok):
    ids = {tok.eos_token_id}
    configured = model.generation_config.eos_token_id
    ids |= set(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}


def reasoning_token_count(tok, ref) -> int:
    """Tokens generated before the token where ``</think>`` begins (all of them when unfinished)."""
    if ref.outcome != "answered":
        return len(ref.tokens)
    n = 0
    while ref.reasoning.startswith(tok.decode(ref.tokens[: n + 1], skip_special_tokens=False)):
        n += 1
    return n


def assert_agree(judgements, refs):
    for j, r in zip(judgements, refs):
        assert j.outcome == r.outcome
        assert j.reasoning == r.reasoning
        assert abs(j.score - r.score) <= 1e-4, (j, r)
        assert abs(j.true_logit - r.true_logit) <= 1e-3 and abs(j.false_logit - r.false_logit) <= 1e-3


@pytest.mark.parametrize("family", list(FAMILIES))
def test_matches_reference_across_engines_and_batch_sizes(tokenizers, family):
    model, tok = planted(tokenizers, family)
    pairs = make_pairs(10, seed=1)
    refs = [reference_judge(model, tok, q, p, MAX_NEW, eos_ids(model, tok)) for q, p in pairs]
    outcomes = {r.outcome for r in refs}
    lengths = {len(r.tokens) for r in refs}
    assert "answered" in outcomes and len(lengths) >= 4, "the planted model should finish at varied steps"
    for engine in ("generate", "continuous"):
        for batch_size in (1, 3, 16):
            ranker = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, engine=engine, batch_size=batch_size)
            judgements = ranker.judge(pairs)
            assert_agree(judgements, refs)
            for j, r, (q, p) in zip(judgements, refs, pairs):
                assert j.prompt_tokens == len(tok(ranker.prepare(q, p).prompt)["input_ids"])
                assert j.reasoning_tokens == reasoning_token_count(tok, r)


def test_rows_never_finishing_take_the_forced_path(tokenizers):
    tok = tokenizers["qwen"]
    model = tiny_model(tok, "qwen2", seed=3)  # not planted: it never writes </think>
    pairs = make_pairs(5, seed=2)
    refs = [reference_judge(model, tok, q, p, 12, eos_ids(model, tok)) for q, p in pairs]
    assert {r.outcome for r in refs} == {"forced"}
    for engine in ("generate", "continuous"):
        js = Rank1.from_model(model, tok, max_new_tokens=12, engine=engine, batch_size=4).judge(pairs)
        assert_agree(js, refs)
        assert all(j.reasoning_tokens == 12 for j in js)


def test_think_closed_inside_a_token(tokenizers):
    """</think> followed by a newline in the same token (">\\n"): read right after </think> itself."""
    model, tok = planted(tokenizers, "qwen-plain", tail=">\n")
    pairs = make_pairs(8, seed=4)
    refs = [reference_judge(model, tok, q, p, MAX_NEW, eos_ids(model, tok)) for q, p in pairs]
    assert any(r.outcome == "answered" for r in refs)
    for engine in ("generate", "continuous"):
        js = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, engine=engine, batch_size=4).judge(pairs)
        assert_agree(js, refs)


def test_eos_before_think_is_forced(tokenizers):
    tok = tokenizers["llama"]
    model = tiny_model(tok, "llama", seed=5)
    boost_rows(model, [tok.eos_token_id], 3.0)
    pairs = make_pairs(8, seed=5)
    refs = [reference_judge(model, tok, q, p, MAX_NEW, eos_ids(model, tok)) for q, p in pairs]
    early = [r for r in refs if len(r.tokens) < MAX_NEW]
    assert early and all(r.outcome == "forced" for r in refs)
    for engine in ("generate", "continuous"):
        js = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, engine=engine, batch_size=3).judge(pairs)
        assert_agree(js, refs)


def test_checkpoint_generation_config_cannot_make_it_sample(tokenizers):
    model, tok = planted(tokenizers, "qwen")
    pairs = make_pairs(6, seed=6)
    refs = [reference_judge(model, tok, q, p, MAX_NEW, eos_ids(model, tok)) for q, p in pairs]
    gc = model.generation_config
    gc.do_sample, gc.temperature, gc.top_k, gc.top_p, gc.repetition_penalty = True, 0.7, 5, 0.8, 1.3
    torch.manual_seed(123)
    for engine in ("generate", "continuous"):
        js = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, engine=engine).judge(pairs)
        assert_agree(js, refs)


def test_batch_invariance(tokenizers):
    """A pair's judgement does not depend on its neighbours or on the batch size."""
    model, tok = planted(tokenizers, "mistral")
    target = make_pairs(1, seed=7, max_words=30)[0]
    alone = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, batch_size=1).judge([target])[0]
    for seed, batch_size in ((8, 4), (9, 16)):
        others = make_pairs(12, seed=seed)
        for engine in ("generate", "continuous"):
            js = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, engine=engine, batch_size=batch_size).judge(
                others[:5] + [target] + others[5:]
            )
            j = js[5]
            assert (j.reasoning, j.reasoning_tokens, j.outcome) == (alone.reasoning, alone.reasoning_tokens, alone.outcome)
            assert abs(j.score - alone.score) <= 1e-4


def test_prompt_is_exact_and_uses_the_tokenizers_special_token_rule(tokenizers):
    for family, bos in (("qwen", None), ("llama", 128000), ("mistral", 1)):
        tok = tokenizers[family]
        ranker = Rank1.from_model(tiny_model(tok, FAMILIES[family][1]), tok, max_new_tokens=4)
        prepared = ranker.prepare("what is a cat Answer briefly.", "Cats are felines.")
        expected = (
            "Determine if the following passage is relevant to the query. Answer only with 'true' or 'false'.\n"
            "Query: what is a cat Answer briefly.\nPassage: Cats are felines.\n<think>"
        )
        assert prepared.prompt == expected
        assert (prepared.ids[0] == bos) if bos is not None else prepared.ids == tok(expected, add_special_tokens=False)["input_ids"]


def test_instruction_title_and_dataset_prompt(tokenizers):
    tok = tokenizers["qwen"]
    model, _ = planted(tokenizers, "qwen")
    ranker = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, dataset_prompt="Find docs for: FILL_QUERY_HERE")
    a = ranker.judge([("cat", {"title": "Felines", "text": "Cats purr."}, "Be strict.")])[0]
    plain = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW)
    b = plain.judge([("Find docs for: cat Be strict.", "Felines Cats purr.")])[0]
    assert (a.score, a.reasoning) == (b.score, b.reasoning)
    # An instruction equal to the query is not repeated.
    c = plain.judge([("cat", "Cats purr.", "cat")])[0]
    d = plain.judge([("cat", "Cats purr.")])[0]
    assert c.score == d.score


def test_passage_only_truncation(tokenizers):
    tok = tokenizers["llama"]
    model = tiny_model(tok, "llama")
    ranker = Rank1.from_model(model, tok, max_new_tokens=16, context_size=80)
    long_passage = "word " * 300
    prepared = ranker.prepare("a query", long_passage)
    assert prepared.truncated and len(prepared.ids) <= 80 - 16
    assert prepared.prompt.endswith("\n<think>") and "\nPassage: word word" in prepared.prompt
    j = ranker.judge([("a query", long_passage)])[0]
    assert j.truncated and j.prompt_tokens <= 64
    assert not ranker.judge([("a query", "short")])[0].truncated
    with pytest.raises(Rank1Error, match="query too long"):
        ranker.prepare("q " * 200, "p")


def test_predict_and_rank(tokenizers):
    model, tok = planted(tokenizers, "qwen")
    ranker = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW)
    pairs = make_pairs(6, seed=10)
    scores = ranker.predict(pairs)
    assert scores.dtype == np.float32 and scores.shape == (6,)
    assert np.allclose(scores, [j.score for j in ranker.judge(pairs)])
    docs = [p for _, p in pairs]
    hits = ranker.rank(pairs[0][0], docs, top_k=3, return_documents=True)
    assert len(hits) == 3 and [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    all_scores = ranker.predict([(pairs[0][0], d) for d in docs])
    assert hits[0]["corpus_id"] == int(np.argmax(all_scores)) and hits[0]["text"] == docs[hits[0]["corpus_id"]]


def test_bad_input_and_bad_tokenizer(tokenizers):
    tok = tokenizers["qwen"]
    ranker = Rank1.from_model(tiny_model(tok), tok, max_new_tokens=4)
    for bad in [("", "p"), ("q", "  "), ("q",), "qp", ("q", 3)]:
        with pytest.raises(Rank1Error):
            ranker.judge([bad])
    with pytest.raises(Rank1Error):
        Rank1.from_model(tiny_model(tok), tok, engine="warp")
    with pytest.raises(Rank1Error, match="dataset prompt"):
        Rank1.from_model(tiny_model(tok), tok, dataset_prompt="no placeholder").judge([("q", "p")])


def test_real_weights_smollm2_end_to_end():
    """Real SmolLM2-135M weights (a Llama model) through Rank1(path): structure and reference agreement."""
    from rank1_hf.offline import smollm2

    ranker = Rank1(str(smollm2()), max_new_tokens=12, batch_size=2)
    pairs = [("what do cats eat", "Cats are carnivores and eat mostly meat."), ("capital of france", "Paris is the capital of France.")]
    judgements = ranker.judge(pairs)
    refs = [reference_judge(ranker.model, ranker.tokenizer, q, p, 12, eos_ids(ranker.model, ranker.tokenizer)) for q, p in pairs]
    assert_agree(judgements, refs)
    for j in judgements:
        assert 0.0 <= j.score <= 1.0 and j.outcome in ("answered", "forced") and j.reasoning_tokens <= 12


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_think_detector_skips_no_closing_token(tokenizers, family):
    """The detector decodes a row's tail only after tokens that hold ">"; it must still find every
    "</think>" the plain rule (decode the tail after every token) finds, wherever the pieces split."""
    tok = tokenizers[family]
    detector = ThinkDetector(tok)
    rng = random.Random(0)
    pieces = ["</think>", "</", "think", ">", ">\n", "</think>\n", "a>", " >", "<", "thin", "k>"]
    alphabet = [tok.encode(p, add_special_tokens=False) for p in pieces + WORDS]
    found = 0
    for _ in range(300):
        generated: list[int] = []
        for _ in range(rng.randint(1, 12)):
            generated += rng.choice(alphabet)
        for n in range(1, len(generated) + 1):
            tail = tok.decode(generated[:n][-detector.window :], skip_special_tokens=False)
            plain = THINK_END in tail
            got = detector.check(generated[:n])
            if THINK_END in tok.decode(generated[: n - 1], skip_special_tokens=False):
                break  # rows stop at the first "</think>"
            assert (got is not None) == plain, (family, generated[:n])
            if got is not None:
                assert got.clean == tail.endswith(THINK_END)
                found += 1
                break
    assert found > 50
