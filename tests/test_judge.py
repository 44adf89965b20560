"""Batched judge() against the independent slow reference, for every rank1 model family."""

import random

import numpy as np
import pytest
import torch
from conftest import FAMILIES, PLANT_FACTOR, WORDS, make_pairs
from plant import boost_rows, plant_lengths, plant_think
from reference import reference_judge

from rank1_hf import Rank1, Rank1Error
from rank1_hf.testing import tiny_model
from rank1_hf.prompt import THINK_END, build_prompt
from rank1_hf.engine.stopping import ThinkDetector

MAX_NEW = 40


def planted(tokenizers, family, seed=0, factor=None, tail=None):
    tok = tokenizers[family]
    model = tiny_model(tok, FAMILIES[family][1], seed=seed)
    plant_think(model, tok, PLANT_FACTOR[family] if factor is None else factor, tail=tail)
    return model, tok


# The end-of-sequence ids of the tiny models, written out: each tokenizer's eos (Qwen2.5's
# <|endoftext|>, Llama 3's <|eot_id|>, Mistral's </s>), which tiny_model's generation_config repeats.
EOS = {"qwen": {151643}, "qwen-plain": {151643}, "llama": {128009}, "mistral": {2}}
# Llama 3.1's generation_config lists three: <|end_of_text|>, <|eom_id|>, <|eot_id|>.
LLAMA31_EOS = [128001, 128008, 128009]


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
    refs = [reference_judge(model, tok, q, p, MAX_NEW, EOS[family]) for q, p in pairs]
    outcomes = {r.outcome for r in refs}
    lengths = {len(r.tokens) for r in refs}
    assert "answered" in outcomes and len(lengths) >= 4, "the planted model should finish at varied steps"
    for engine in ("generate", "continuous"):
        for batch_size in (1, 3, 16):
            ranker = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, engine=engine, batch_size=batch_size)
            judgements = ranker.judge(pairs)
            assert_agree(judgements, refs)
            for j, r, (q, p) in zip(judgements, refs, pairs):
                assert j.prompt_tokens == r.prompt_tokens
                assert j.reasoning_tokens == reasoning_token_count(tok, r)


def test_rows_never_finishing_take_the_forced_path(tokenizers):
    tok = tokenizers["qwen"]
    model = tiny_model(tok, "qwen2", seed=3)  # not planted: it never writes </think>
    pairs = make_pairs(5, seed=2)
    refs = [reference_judge(model, tok, q, p, 12, EOS["qwen"]) for q, p in pairs]
    assert {r.outcome for r in refs} == {"forced"}
    for engine in ("generate", "continuous"):
        js = Rank1.from_model(model, tok, max_new_tokens=12, engine=engine, batch_size=4).judge(pairs)
        assert_agree(js, refs)
        assert all(j.reasoning_tokens == 12 for j in js)


def test_think_closed_inside_a_token(tokenizers):
    """</think> followed by a newline in the same token (">\\n"): read right after </think> itself."""
    model, tok = planted(tokenizers, "qwen-plain", tail=">\n")
    pairs = make_pairs(8, seed=4)
    refs = [reference_judge(model, tok, q, p, MAX_NEW, EOS["qwen-plain"]) for q, p in pairs]
    assert any(r.outcome == "answered" for r in refs)
    for engine in ("generate", "continuous"):
        js = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, engine=engine, batch_size=4).judge(pairs)
        assert_agree(js, refs)


def test_eos_before_think_is_forced(tokenizers):
    tok = tokenizers["llama"]
    model = tiny_model(tok, "llama", seed=5)
    boost_rows(model, [tok.eos_token_id], 3.0)
    pairs = make_pairs(8, seed=5)
    refs = [reference_judge(model, tok, q, p, MAX_NEW, EOS["llama"]) for q, p in pairs]
    early = [r for r in refs if len(r.tokens) < MAX_NEW]
    assert early and all(r.outcome == "forced" for r in refs)
    for engine in ("generate", "continuous"):
        js = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, engine=engine, batch_size=3).judge(pairs)
        assert_agree(js, refs)


def test_checkpoint_generation_config_cannot_make_it_sample(tokenizers):
    model, tok = planted(tokenizers, "qwen")
    pairs = make_pairs(6, seed=6)
    refs = [reference_judge(model, tok, q, p, MAX_NEW, EOS["qwen"]) for q, p in pairs]
    gc = model.generation_config
    gc.do_sample, gc.temperature, gc.top_k, gc.top_p, gc.repetition_penalty = True, 0.7, 5, 0.8, 1.3
    torch.manual_seed(123)
    for engine in ("generate", "continuous"):
        js = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, engine=engine).judge(pairs)
        assert_agree(js, refs)


@pytest.mark.parametrize("outcome", ["answered", "forced"])
def test_batch_invariance(tokenizers, outcome):
    """A pair's judgement, both logits included, does not depend on its neighbours, the batch size or
    the engine: for a row that closes </think> itself (readout from its next decode step) and for one
    forced at the cap (readout from the closing pass)."""
    tok = tokenizers["mistral"]
    model = tiny_model(tok, "mistral", seed=0)
    target = make_pairs(1, seed=7, max_words=30)[0]
    n = len(tok(build_prompt(*target))["input_ids"])
    others = make_pairs(14, seed=8)
    # The target closes </think> after 9 tokens, or never; the neighbours reason for 2..30 tokens.
    lengths = {len(tok(build_prompt(q, p))["input_ids"]): 2 + 7 * k % 29 for k, (q, p) in enumerate(others)}
    lengths.pop(n, None)
    handle = plant_lengths(model, tok, {**lengths, n: 9} if outcome == "answered" else lengths,
                           never=set() if outcome == "answered" else {n})
    try:
        alone = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, batch_size=1).judge([target])[0]
        assert alone.outcome == outcome
        for batch_size in (4, 16):
            for engine in ("generate", "continuous"):
                ranker = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, engine=engine, batch_size=batch_size)
                j = ranker.judge(others[:5] + [target] + others[5:])[5]
                assert (j.reasoning, j.reasoning_tokens, j.outcome) == (alone.reasoning, alone.reasoning_tokens, outcome)
                # float32 on CPU: batched and single-row matmuls differ by ~1e-6 in a logit.
                assert abs(j.true_logit - alone.true_logit) <= 1e-3, (engine, batch_size)
                assert abs(j.false_logit - alone.false_logit) <= 1e-3, (engine, batch_size)
    finally:
        handle.remove()


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


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_passage_only_truncation(tokenizers, family):
    """The prompt is cut to exactly context_size - max_new_tokens tokens (each " word" is one token, so
    the longest fitting passage prefix fills the budget), only the passage is cut, and the query (with
    its instruction and dataset prompt) survives whole."""
    tok = tokenizers[family]
    model = tiny_model(tok, FAMILIES[family][1])
    head = "Determine if the following passage is relevant to the query. Answer only with 'true' or 'false'.\nQuery: "
    long_passage = "word " * 300
    for dataset_prompt, instruction, query in ((None, None, "a query"),
                                               ("Find docs for: FILL_QUERY_HERE", "Be strict.",
                                                "Find docs for: a query Be strict.")):
        ranker = Rank1.from_model(model, tok, max_new_tokens=16, context_size=96, dataset_prompt=dataset_prompt)
        j = ranker.judge([("a query", long_passage, instruction)])[0]
        assert j.truncated and j.prompt_tokens == 96 - 16
        prepared = ranker.prepare(query, long_passage)
        assert prepared.truncated and len(prepared.ids) == 80
        assert prepared.ids == tok(prepared.prompt)["input_ids"]
        kept = prepared.prompt[len(head + query + "\nPassage: ") : -len("\n<think>")]
        assert prepared.prompt == head + query + "\nPassage: " + kept + "\n<think>"
        assert kept and long_passage.startswith(kept) and kept == kept.rstrip()
    ranker = Rank1.from_model(model, tok, max_new_tokens=16, context_size=96)
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


@pytest.fixture(scope="module")
def smollm2_ranker():
    from rank1_hf.model.assets import smollm2

    return Rank1(str(smollm2()), max_new_tokens=12, context_size=600, batch_size=2)


def test_real_weights_smollm2_end_to_end(smollm2_ranker):
    """Real SmolLM2-135M weights (a Llama model) through Rank1(path): structure and reference agreement."""
    ranker = smollm2_ranker
    pairs = [("what do cats eat", "Cats are carnivores and eat mostly meat."), ("capital of france", "Paris is the capital of France.")]
    judgements = ranker.judge(pairs)
    # SmolLM2-Instruct's only end-of-sequence id: <|im_end|> (2), in its tokenizer and generation_config.
    refs = [reference_judge(ranker.model, ranker.tokenizer, q, p, 12, {2}) for q, p in pairs]
    assert_agree(judgements, refs)
    for j in judgements:
        assert 0.0 <= j.score <= 1.0 and j.outcome in ("answered", "forced") and j.reasoning_tokens <= 12


def test_cut_back_to_the_last_sentence_on_real_weights(smollm2_ranker):
    """SmolLM2 writes several sentences here and stops mid-sentence (at the cap, or on EOS): the forced
    readout reads the text cut back after its last ".", as the reference does."""
    ranker = smollm2_ranker
    prompt = "Think carefully and explain your reasoning in full sentences before answering. FILL_QUERY_HERE"
    pairs = [("Why is the sky blue?", "Sunlight scatters in the air. Blue light scatters most.")]
    refs = [reference_judge(ranker.model, ranker.tokenizer, prompt.replace("FILL_QUERY_HERE", q), p, 24, {2})
            for q, p in pairs]
    text = refs[0].reasoning.strip()  # "Reasoning: ... the sky is not blue. The sky is ..."
    assert refs[0].outcome == "forced" and "." in text and text[-1] not in ".!?", refs[0].reasoning
    for engine in ("continuous", "generate"):
        cut = Rank1.from_model(ranker.model, ranker.tokenizer, max_new_tokens=24, context_size=600, engine=engine,
                               dataset_prompt=prompt)
        assert_agree(cut.judge(pairs), refs)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_think_detector_skips_no_closing_token(tokenizers, family):
    """The detector decodes a short tail, only after tokens that hold ">"; it must find "</think>"
    exactly where decoding the whole row first shows it, wherever the pieces split."""
    tok = tokenizers[family]
    detector = ThinkDetector(tok)
    rng = random.Random(0)
    pieces = ["</think>", "</", "think", ">", ">\n", "</think>\n", "a>", " >", "<", "thin", "k>", "</th", "ink>"]
    alphabet = [tok.encode(p, add_special_tokens=False) for p in pieces + WORDS]
    found = split = 0
    for _ in range(300):
        generated: list[int] = []
        for _ in range(rng.randint(1, 12)):
            generated += rng.choice(alphabet)
        for n in range(1, len(generated) + 1):
            whole = tok.decode(generated[:n], skip_special_tokens=False)
            got = detector.check(generated[:n])
            assert (got is not None) == (THINK_END in whole), (family, generated[:n])
            if got is not None:
                assert got.end == n
                assert got.clean == whole.endswith(THINK_END)  # it ends exactly where the row's text ends
                found += 1
                split += len(tok.decode(generated[n - 1 : n], skip_special_tokens=False)) < len(THINK_END)
                break  # rows stop at the first "</think>"
    assert found > 50 and (split > 10 or family == "qwen")

def test_several_eos_ids_as_in_llama31s_generation_config(tokenizers):
    """Llama 3.1's generation_config ends on any of three ids; the tokenizer names only <|eot_id|>. A row
    that emits <|eom_id|> (128008) ends there, as the reference with all three ids does."""
    tok = tokenizers["llama"]
    assert tok.eos_token_id == 128009
    model = tiny_model(tok, "llama", seed=5)
    model.generation_config.eos_token_id = list(LLAMA31_EOS)
    boost_rows(model, [128008], 3.0)
    pairs = make_pairs(5, seed=5)
    refs = [reference_judge(model, tok, q, p, MAX_NEW, set(LLAMA31_EOS)) for q, p in pairs]
    assert any(len(r.tokens) < MAX_NEW for r in refs), "some rows should end on <|eom_id|>"
    for engine in ("generate", "continuous"):
        js = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, engine=engine, batch_size=3).judge(pairs)
        assert_agree(js, refs)
        assert [j.reasoning_tokens for j in js] == [len(r.tokens) for r in refs]


class WordTokenizer:
    """Just what readout_ids reads of a tokenizer: a call giving input_ids, and unk_token_id."""

    unk_token_id = 0

    def __init__(self, ids):
        self.ids = ids

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": self.ids.get(text, [self.unk_token_id])}


def test_tokenizers_without_distinct_true_false_are_refused(tokenizers):
    model = tiny_model(tokenizers["qwen"])
    for ids, message in (({" false": [5]}, "no token for ' true'"),
                         ({" true": [5], " false": []}, "no token for ' false'"),
                         ({" true": [7, 1], " false": [7, 2]}, "same first token 7")):
        with pytest.raises(Rank1Error, match=message):
            Rank1.from_model(model, WordTokenizer(ids), max_new_tokens=4)


@pytest.mark.parametrize("engine", ["generate", "continuous"])
def test_non_finite_readout_is_the_fallback(tokenizers, engine):
    """A " true" logit of -inf (argmax never picks it, so the reasoning is untouched): score 0.5,
    outcome "fallback", no logits, for answered and forced rows alike."""
    model, tok = planted(tokenizers, "qwen")
    true_id = 830

    def poison(module, args, kwargs, output):
        output.logits[..., true_id] = float("-inf")
        return output

    handle = model.register_forward_hook(poison, with_kwargs=True)
    try:
        pairs = make_pairs(6, seed=1)
        refs = [reference_judge(model, tok, q, p, 12, EOS["qwen"]) for q, p in pairs]
        assert {r.outcome for r in refs} == {"answered", "forced"} and all(r.true_logit == float("-inf") for r in refs)
        js = Rank1.from_model(model, tok, max_new_tokens=12, engine=engine, batch_size=4).judge(pairs)
    finally:
        handle.remove()
    for j, r in zip(js, refs):
        assert (j.outcome, j.score, j.true_logit, j.false_logit) == ("fallback", 0.5, None, None)
        assert j.reasoning == r.reasoning


def test_sliding_window_model_end_to_end(tokenizers, caplog):
    """A Mistral with a 16-token sliding window (shorter than every prompt) goes to the generate engine
    and still judges as the reference, whose full forward passes apply the window themselves."""
    import logging

    tok = tokenizers["mistral"]
    model = tiny_model(tok, "mistral", seed=0, sliding_window=16)
    plant_think(model, tok, PLANT_FACTOR["mistral"])
    pairs = make_pairs(4, seed=1)
    refs = [reference_judge(model, tok, q, p, MAX_NEW, EOS["mistral"]) for q, p in pairs]
    assert "answered" in {r.outcome for r in refs}
    caplog.set_level(logging.INFO, logger="rank1_hf")
    js = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, batch_size=4).judge(pairs)
    assert "engine: generate (asked for 'auto')" in [r.getMessage() for r in caplog.records]
    assert_agree(js, refs)
