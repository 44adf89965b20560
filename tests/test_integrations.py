"""LangChain and rerankers adapters, against the real packages (skipped when they are not installed)."""

from __future__ import annotations

import asyncio
import importlib
import sys

import pytest

from rank1_hf.errors import Rank1Error
from rank1_hf.testing import qwen_tokenizer, tiny_model
from rank1_hf.ranker import Rank1

QUERY = "how do cats purr"
TEXTS = ["Cats purr by vibrating the larynx.", "A deck oven bakes bread.", "Dogs bark.", "Kittens purr too."]


@pytest.fixture(scope="module")
def ranker():
    tok = qwen_tokenizer()
    return Rank1.from_model(tiny_model(tok), tok, max_new_tokens=6, context_size=512, batch_size=4)


@pytest.fixture(scope="module")
def expected(ranker):
    """(text, score) best first, from Rank1.rank."""
    return [(TEXTS[h["corpus_id"]], h["score"]) for h in ranker.rank(QUERY, TEXTS)]


def test_langchain_compressor_reranks_documents(ranker, expected):
    pytest.importorskip("langchain_core", reason="needs langchain-core (the [langchain] extra)")
    from langchain_core.documents import BaseDocumentCompressor, Document

    from rank1_hf.integrations.langchain import Rank1Compressor

    compressor = Rank1Compressor(ranker=ranker, top_n=2)
    assert isinstance(compressor, BaseDocumentCompressor)
    docs = [Document(page_content=t, metadata={"source": i}) for i, t in enumerate(TEXTS)]
    out = compressor.compress_documents(docs, QUERY)
    assert [(d.page_content, d.metadata["relevance_score"]) for d in out] == expected[:2]
    assert out[0].metadata["source"] == TEXTS.index(out[0].page_content)  # original metadata kept
    assert {"rank1_reasoning", "rank1_outcome"} <= set(out[0].metadata)
    assert "relevance_score" not in docs[0].metadata  # the inputs are not modified
    assert len(Rank1Compressor(ranker=ranker, top_n=None).compress_documents(docs, QUERY)) == 4
    assert compressor.compress_documents([], QUERY) == []
    # The async path awaits the shared engine and gives the same documents.
    again = asyncio.run(compressor.acompress_documents(docs, QUERY))
    assert [(d.page_content, d.metadata["relevance_score"]) for d in again] == expected[:2]
    assert asyncio.run(compressor.acompress_documents([], QUERY)) == []


def test_rerankers_ranker_returns_ranked_results(ranker, expected):
    pytest.importorskip("rerankers", reason="needs rerankers (the [rerankers] extra)")
    from rerankers.models.ranker import BaseRanker
    from rerankers.results import RankedResults

    from rank1_hf.integrations.rerankers import Rank1Ranker

    model = Rank1Ranker.from_ranker(ranker)
    assert isinstance(model, BaseRanker)
    results = model.rank(QUERY, TEXTS, doc_ids=["a", "b", "c", "d"])
    assert isinstance(results, RankedResults) and results.has_scores
    assert [(r.document.text, r.score) for r in results] == expected
    assert [r.rank for r in results] == [1, 2, 3, 4]
    best = results.top_k(1)[0]
    assert best.document.doc_id == "abcd"[TEXTS.index(best.document.text)]
    assert "rank1_reasoning" in best.document.metadata
    assert results.get_score_by_docid("a") == dict(expected)[TEXTS[0]]
    assert model.score(QUERY, TEXTS[0]) == pytest.approx(dict(expected)[TEXTS[0]], abs=1e-5)  # batch of 1
    assert [r.document.doc_id for r in model.rank(QUERY, TEXTS[:2])] == sorted(
        [0, 1], key=lambda i: -dict(expected)[TEXTS[i]])
    awaited = asyncio.run(model.rank_async(QUERY, TEXTS, doc_ids=["a", "b", "c", "d"]))
    assert [(r.document.text, r.score, r.document.doc_id) for r in awaited] == [
        (r.document.text, r.score, r.document.doc_id) for r in results]


@pytest.mark.parametrize("module, package", [("langchain", "langchain_core"), ("rerankers", "rerankers")])
def test_missing_package_is_a_clear_error(monkeypatch, module, package):
    monkeypatch.setitem(sys.modules, package, None)
    for name in [n for n in sys.modules if n.startswith(package + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, f"rank1_hf.integrations.{module}", raising=False)
    with pytest.raises(Rank1Error, match=rf"pip install 'rank1-hf\[{module}\]'"):
        importlib.import_module(f"rank1_hf.integrations.{module}")


INSTRUCTION = "Only passages about cats are relevant."


def _recording(ranker, monkeypatch) -> list:
    """The (query text, passage text) of every pair rank1 is asked to judge."""
    calls: list = []
    prepare = ranker.core.prepare

    def spy(query, passage):
        calls.append((query, passage))
        return prepare(query, passage)

    monkeypatch.setattr(ranker.core, "prepare", spy)
    return calls


def test_langchain_compressor_passes_the_instruction_through(ranker, monkeypatch):
    pytest.importorskip("langchain_core", reason="needs langchain-core (the [langchain] extra)")
    from langchain_core.documents import Document

    from rank1_hf.integrations.langchain import Rank1Compressor

    calls = _recording(ranker, monkeypatch)
    Rank1Compressor(ranker=ranker, top_n=None, instruction=INSTRUCTION).compress_documents(
        [Document(page_content=t) for t in TEXTS], QUERY)
    # rank1's join, written out: "{query} {instruction}"
    assert sorted(calls) == sorted((f"{QUERY} {INSTRUCTION}", t) for t in TEXTS)


def test_rerankers_ranker_passes_the_instruction_through(ranker, monkeypatch):
    pytest.importorskip("rerankers", reason="needs rerankers (the [rerankers] extra)")
    from rank1_hf.integrations.rerankers import Rank1Ranker

    model = Rank1Ranker.from_ranker(ranker, instruction=INSTRUCTION)
    calls = _recording(ranker, monkeypatch)
    model.rank(QUERY, TEXTS)
    assert sorted(calls) == sorted((f"{QUERY} {INSTRUCTION}", t) for t in TEXTS)
    calls.clear()
    model.score(QUERY, TEXTS[1])
    assert calls == [(f"{QUERY} {INSTRUCTION}", TEXTS[1])]


def test_rerankers_keeps_a_document_id_of_zero(ranker):
    """doc_id 0 is an id like any other: a document given id 0 (in doc_ids or on a Document) keeps it,
    wherever it stands; only a missing id falls back to the document's position."""
    pytest.importorskip("rerankers", reason="needs rerankers (the [rerankers] extra)")
    from rerankers.documents import Document

    from rank1_hf.integrations.rerankers import Rank1Ranker

    model = Rank1Ranker.from_ranker(ranker)
    results = model.rank(QUERY, TEXTS, doc_ids=[3, 0, 2, 1])
    assert {r.document.text: r.document.doc_id for r in results} == dict(zip(TEXTS, [3, 0, 2, 1]))
    documents = [Document(text=TEXTS[0], doc_id=7), Document(text=TEXTS[1], doc_id=0), Document(text=TEXTS[2])]
    ids = {r.document.text: r.document.doc_id for r in model.rank(QUERY, documents)}
    assert ids[TEXTS[1]] == 0 and ids[TEXTS[0]] == 7
