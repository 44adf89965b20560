"""PyTerrier, LlamaIndex and Haystack adapters, against the real packages (each skipped when not installed).

Expected scores and orders always come from Rank1.judge / Rank1.rank on the same pairs: an adapter must
agree with the library, never with itself.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys

import pytest
from conftest import ranker_for

from rank1_hf.errors import Rank1Error
from rank1_hf.judgement import Judgement
from rank1_hf.io.store import JudgementStore, settings_key

# Two queries; the tiny model gives every passage of a query a different score (no ties), so Rank1.rank's
# order (ties by input position) and the run order (ties by docno) are the same order.
QUERIES = {"q2": "best bread oven", "q1": "how do cats purr"}
DOCS = {
    "d1": "Cats purr by vibrating the larynx.",
    "d2": "A deck oven bakes bread.",
    "d3": "Dogs bark.",
    "d4": "Kittens purr too.",
    "d5": "Rivers flood in spring.",
    "d6": "Sourdough needs a hot oven.",
}
# The first stage's results (qid, docno, score): q2 before q1 and not best first by docno, so that an
# adapter that keeps the input order or sorts by docno is caught.
FIRST_STAGE = [("q2", "d1", 9.0), ("q2", "d5", 8.0), ("q2", "d6", 7.0), ("q2", "d2", 6.0),
               ("q1", "d3", 9.0), ("q1", "d2", 8.0), ("q1", "d4", 7.0), ("q1", "d1", 6.0)]
QUERY, TEXTS = QUERIES["q1"], [DOCS[d] for d in ("d1", "d2", "d3", "d4")]
# Scores judged in different batches (other pairs beside them, other concurrent callers) differ in the last
# float bits: compared with this tolerance, never with ==.
TOL = 1e-4


def assert_ranked(got, want):
    """Two [(text or id, score)] rankings: the same items in the same order, scores within TOL."""
    assert [item for item, _ in got] == [item for item, _ in want]
    assert [score for _, score in got] == pytest.approx([score for _, score in want], abs=TOL)




@pytest.fixture(scope="module")
def ranker(tiny):
    return ranker_for(tiny)


def expected_ranking(ranker, query, docnos, **options):
    """[(docno, score)] best first, from Rank1.rank."""
    return [(docnos[h["corpus_id"]], h["score"]) for h in ranker.rank(query, [DOCS[d] for d in docnos], **options)]


def fail(*args, **kwargs):
    raise AssertionError("judged again: the store was not used")


class Scripted:
    """A stand-in ranker whose judge returns given scores per passage (for ties, which a model rarely makes)."""

    store = None

    def __init__(self, scores):
        self.scores = scores

    def judge(self, pairs, batch_size=None, show_progress_bar=None, **kwargs):
        return [Judgement(self.scores[p[1]], "answered", "r", 1, 9, 0.0, 0.0, False) for p in pairs]


# ---------------------------------------------------------------------------------------------- PyTerrier


@pytest.fixture(scope="module")
def pt():
    return pytest.importorskip("pyterrier", reason="needs pyterrier (the [pyterrier] extra)")


def results_frame(rows=FIRST_STAGE):
    import pandas as pd

    frame = pd.DataFrame([{"qid": q, "query": QUERIES[q], "docno": d, "text": DOCS[d], "score": s} for q, d, s in rows])
    frame["rank"] = frame.groupby("qid")["score"].rank(ascending=False, method="first").astype(int) - 1
    frame["source"] = [f"{q}/{d}" for q, d, _ in rows]  # any other column is carried along
    return frame


def first_stage(pt):
    """A stand-in for ``bm25 >> pt.text.get_text(...)``: the fixed FIRST_STAGE results of the topics given."""
    results = results_frame().drop(columns=["query"])
    return pt.apply.generic(lambda topics: topics[["qid", "query"]].merge(results, on="qid"))


def test_pyterrier_reranker_rescores_and_reranks_per_query(pt, ranker):
    from rank1_hf.integrations.pyterrier import Rank1Reranker

    reranker = Rank1Reranker(ranker, reasoning=True, outcome=True)
    assert isinstance(reranker, pt.Transformer)
    inp = results_frame()
    out = reranker(inp)
    expected = []  # queries in sorted qid order, as the CLI writes a run
    for qid in sorted(QUERIES):
        docnos = [d for q, d, _ in FIRST_STAGE if q == qid]
        expected += [(qid, d, s, r) for r, (d, s) in enumerate(expected_ranking(ranker, QUERIES[qid], docnos))]
    assert list(zip(out.qid, out.docno, out["rank"])) == [(q, d, r) for q, d, _, r in expected]
    assert out.score.tolist() == pytest.approx([s for _, _, s, _ in expected], abs=TOL)
    assert list(out.index) == list(range(len(inp)))
    assert (out.source == out.qid + "/" + out.docno).all() and (out.text == out.docno.map(DOCS)).all()
    judged = ranker.judge([(QUERIES[q], DOCS[d]) for q, d in zip(out.qid, out.docno)])
    assert out.score.tolist() == pytest.approx([j.score for j in judged], abs=TOL)  # the library's scores
    assert out.rank1_reasoning.tolist() == [j.reasoning for j in judged]
    assert out.rank1_outcome.tolist() == [j.outcome for j in judged]
    assert inp.score.tolist() == [s for _, _, s in FIRST_STAGE]  # the input frame is not modified
    plain = Rank1Reranker(ranker)(inp)
    assert "rank1_reasoning" not in plain and plain.score.tolist() == out.score.tolist()


def test_pyterrier_ties_follow_the_run_order_rule(pt):
    """Equal scores: docno descending (trec_eval's rule, rank1_hf.io.formats.ranked), not input order."""
    from rank1_hf.io import formats
    from rank1_hf.integrations.pyterrier import Rank1Reranker

    scores = {DOCS["d1"]: 0.5, DOCS["d5"]: 0.9, DOCS["d6"]: 0.5, DOCS["d2"]: 0.5}
    out = Rank1Reranker(Scripted(scores))(results_frame(FIRST_STAGE[:4]))
    assert list(zip(out.docno, out.score)) == formats.ranked([(d, scores[DOCS[d]]) for _, d, _ in FIRST_STAGE[:4]])
    assert out.docno.tolist() == ["d5", "d6", "d2", "d1"]


def test_pyterrier_pipeline_and_experiment(pt, ranker):
    import ir_measures
    import pandas as pd

    from rank1_hf.integrations.pyterrier import Rank1Reranker

    topics = pd.DataFrame([{"qid": q, "query": t} for q, t in QUERIES.items()])
    qrels = pd.DataFrame([{"qid": "q1", "docno": "d1", "label": 1}, {"qid": "q1", "docno": "d4", "label": 2},
                          {"qid": "q2", "docno": "d6", "label": 1}, {"qid": "q2", "docno": "d2", "label": 2}])
    pipeline = first_stage(pt) % 3 >> Rank1Reranker(ranker)
    out = pipeline(topics)
    run = {}
    for qid in sorted(QUERIES):
        top3 = [d for q, d, _ in FIRST_STAGE if q == qid][:3]
        run[qid] = expected_ranking(ranker, QUERIES[qid], top3)
    assert [(q, d) for q, d in zip(out.qid, out.docno)] == [(q, d) for q in run for d, _ in run[q]]
    measures = [ir_measures.nDCG @ 3, ir_measures.P @ 1, ir_measures.RR]
    result = pt.Experiment([first_stage(pt) % 3, pipeline], topics, qrels, measures, names=["first", "rank1"])
    want = ir_measures.calc_aggregate(measures, [ir_measures.Qrel(r.qid, r.docno, r.label) for r in qrels.itertuples()],
                                      {q: dict(docs) for q, docs in run.items()})
    got = result.set_index("name").loc["rank1"]
    for m in measures:
        assert got[str(m)] == pytest.approx(want[m], abs=1e-9), m
    first = result.set_index("name").loc["first"]
    assert any(got[str(m)] != first[str(m)] for m in measures)  # the reranker changed the ranking


def test_pyterrier_reuses_the_store(pt, tiny, tmp_path):
    from rank1_hf.integrations.pyterrier import Rank1Reranker

    path = tmp_path / "judgements.sqlite"
    writer = ranker_for(tiny, store=path)
    first = Rank1Reranker(writer, instruction="be strict")(results_frame())
    with JudgementStore(path) as store:
        assert store.count(settings_key(writer.settings())) == len(FIRST_STAGE)
    reader = ranker_for(tiny, store=path)
    reader.judge_iter = fail  # type: ignore[method-assign]
    again = Rank1Reranker(reader, instruction="be strict")(results_frame())
    assert again.equals(first)
    # The instruction is part of each pair: Rank1.rank with the same instruction finds the same judgements.
    q1 = first[first.qid == "q1"]
    assert_ranked(list(zip(q1.docno, q1.score)), expected_ranking(reader, QUERY, ["d3", "d2", "d4", "d1"],
                                                                  instruction="be strict"))


def test_pyterrier_empty_and_bad_input(pt, ranker):
    import pandas as pd

    from rank1_hf.integrations.pyterrier import Rank1Reranker

    reranker = Rank1Reranker(ranker, outcome=True)
    empty = reranker(results_frame().iloc[:0])
    assert len(empty) == 0
    assert list(empty.columns) == ["qid", "query", "docno", "text", "source", "score", "rank", "rank1_outcome"]
    assert pt.inspect.transformer_inputs(reranker) == [["qid", "query", "docno", "text"]]
    assert pt.inspect.transformer_outputs(reranker, ["qid", "query", "docno", "text"]) == [
        "qid", "query", "docno", "text", "score", "rank", "rank1_outcome"]
    with pytest.raises(Rank1Error, match=r"missing: text \(add the passages"):
        reranker(results_frame().drop(columns=["text"]))
    with pytest.raises(Rank1Error, match="missing: qid, query"):
        reranker(pd.DataFrame({"docno": ["d1"], "text": ["x"]}))
    with pytest.raises(Rank1Error, match="DataFrame"):
        reranker.transform([("q1", "d1")])
    blank = results_frame()
    blank.loc[2, "text"] = "  "
    with pytest.raises(Rank1Error, match=r"qid 'q2' docno 'd6' has no passage text"):
        reranker(blank)
    missing = results_frame()
    missing.loc[5, "text"] = None
    with pytest.raises(Rank1Error, match=r"docno 'd2' has no passage text"):
        reranker(missing)
    twice = results_frame(FIRST_STAGE + FIRST_STAGE[:1])
    with pytest.raises(Rank1Error, match=r"duplicate pair qid 'q2' docno 'd1'"):
        reranker(twice)
    with pytest.raises(pt.validate.InputValidationError):
        pt.inspect.transformer_outputs(reranker, ["qid", "query"])


# ---------------------------------------------------------------------------------------------- LlamaIndex


@pytest.fixture(scope="module")
def expected(ranker):
    """(text, score) best first for QUERY over TEXTS, from Rank1.rank."""
    return [(TEXTS[h["corpus_id"]], h["score"]) for h in ranker.rank(QUERY, TEXTS)]


def li_nodes():
    from llama_index.core.schema import NodeWithScore, TextNode

    return [NodeWithScore(node=TextNode(text=t, id_=f"n{i}", metadata={"source": i}), score=1.0 - i / 10)
            for i, t in enumerate(TEXTS)]


@pytest.fixture(scope="module")
def llama_index():
    return pytest.importorskip("llama_index.core", reason="needs llama-index-core (the [llamaindex] extra)")


def test_llamaindex_rerank_sets_scores_and_order(llama_index, ranker, expected):
    from llama_index.core.postprocessor.types import BaseNodePostprocessor
    from llama_index.core.schema import MetadataMode

    from rank1_hf.integrations.llamaindex import Rank1Rerank

    rerank = Rank1Rerank(ranker=ranker, top_n=2)
    assert isinstance(rerank, BaseNodePostprocessor)
    nodes = li_nodes()
    out = rerank.postprocess_nodes(nodes, query_str=QUERY)
    assert_ranked([(n.node.get_content(), n.score) for n in out], expected[:2])
    judged = dict(zip(TEXTS, ranker.judge([(QUERY, t) for t in TEXTS])))
    for n in out:
        text = n.node.get_content()
        assert n.node.metadata == {"source": TEXTS.index(text), "rank1_reasoning": judged[text].reasoning,
                                   "rank1_outcome": judged[text].outcome}
        # the reasoning is for the reader, not for the LLM's context or the embedder
        assert judged[text].reasoning not in n.node.get_content(metadata_mode=MetadataMode.LLM)
        assert "rank1_outcome" not in n.node.get_content(metadata_mode=MetadataMode.EMBED)
        assert "source" in n.node.get_content(metadata_mode=MetadataMode.LLM)
    assert [n.score for n in nodes] == [1.0, 0.9, 0.8, 0.7] and "rank1_outcome" not in nodes[0].node.metadata
    every = Rank1Rerank(ranker=ranker, top_n=None).postprocess_nodes(nodes, query_str=QUERY)
    assert_ranked([(n.node.get_content(), n.score) for n in every], expected)
    assert rerank.postprocess_nodes([], query_str=QUERY) == []


def test_llamaindex_rerank_in_a_query_engine(llama_index, ranker, expected):
    from llama_index.core import VectorStoreIndex
    from llama_index.core.embeddings import MockEmbedding
    from llama_index.core.llms import MockLLM
    from llama_index.core.query_engine import RetrieverQueryEngine

    from rank1_hf.integrations.llamaindex import Rank1Rerank

    index = VectorStoreIndex(nodes=[n.node for n in li_nodes()], embed_model=MockEmbedding(embed_dim=8))
    engine = RetrieverQueryEngine.from_args(index.as_retriever(similarity_top_k=4), llm=MockLLM(),
                                            node_postprocessors=[Rank1Rerank(ranker=ranker, top_n=3)])
    response = engine.query(QUERY)
    assert_ranked([(n.node.get_content(), n.score) for n in response.source_nodes], expected[:3])


def test_llamaindex_async_path_awaits_ajudge(llama_index):
    """apostprocess_nodes awaits the ranker's ajudge (never the blocking judge), then ranks the same way."""
    from rank1_hf.integrations.llamaindex import Rank1Rerank

    scores = {TEXTS[0]: 0.2, TEXTS[1]: 0.7, TEXTS[2]: 0.2, TEXTS[3]: 0.9}

    class AsyncScripted(Scripted):
        def judge(self, pairs, *args, **kwargs):
            raise AssertionError("the async path called the blocking judge")

        async def ajudge(self, pairs, batch_size=None, show_progress_bar=None, *, dataset_prompt=None):
            await asyncio.sleep(0)
            return Scripted.judge(self, pairs)

    rerank = Rank1Rerank(ranker=AsyncScripted(scores), top_n=None)
    out = asyncio.run(rerank.apostprocess_nodes(li_nodes(), query_str=QUERY))
    assert [(n.node.get_content(), n.score) for n in out] == [(TEXTS[3], 0.9), (TEXTS[1], 0.7), (TEXTS[0], 0.2),
                                                              (TEXTS[2], 0.2)]  # ties in input order, as Rank1.rank
    assert asyncio.run(rerank.apostprocess_nodes([], query_str=QUERY)) == []


def test_llamaindex_async_matches_rank(llama_index, ranker, expected):
    from rank1_hf.integrations.llamaindex import Rank1Rerank

    async def both():
        rerank = Rank1Rerank(ranker=ranker, top_n=2)
        return await asyncio.gather(rerank.apostprocess_nodes(li_nodes(), query_str=QUERY),
                                    rerank.apostprocess_nodes(li_nodes()[:2], query_str=QUERY))

    out, two = asyncio.run(both())  # the two calls share the engine's batches: scores within TOL
    assert_ranked([(n.node.get_content(), n.score) for n in out], expected[:2])
    assert_ranked([(n.node.get_content(), n.score) for n in two], [(t, s) for t, s in expected if t in TEXTS[:2]])


def test_llamaindex_reuses_the_store(llama_index, tiny, tmp_path, expected):
    from rank1_hf.integrations.llamaindex import Rank1Rerank

    path = tmp_path / "judgements.sqlite"
    first = Rank1Rerank(ranker=ranker_for(tiny, store=path), top_n=None).postprocess_nodes(li_nodes(), query_str=QUERY)
    assert_ranked([(n.node.get_content(), n.score) for n in first], expected)
    reader = ranker_for(tiny, store=path)
    reader.judge_iter = fail  # type: ignore[method-assign]
    again = Rank1Rerank(ranker=reader, top_n=None).postprocess_nodes(li_nodes(), query_str=QUERY)
    assert [(n.node.get_content(), n.score, n.node.metadata) for n in again] == [
        (n.node.get_content(), n.score, n.node.metadata) for n in first]
    # an instruction makes other pairs: they are judged, not taken from the store
    with pytest.raises(AssertionError, match="judged again"):
        Rank1Rerank(ranker=reader, instruction="be strict").postprocess_nodes(li_nodes(), query_str=QUERY)


def test_llamaindex_bad_input(llama_index, ranker):
    from llama_index.core.schema import NodeWithScore, TextNode

    from rank1_hf.integrations.llamaindex import Rank1Rerank

    rerank = Rank1Rerank(ranker=ranker)
    with pytest.raises(Rank1Error, match="needs the query"):
        rerank.postprocess_nodes(li_nodes())
    with pytest.raises(Rank1Error, match=r"node 'blank' \(item 1\) has no text"):
        rerank.postprocess_nodes([li_nodes()[0], NodeWithScore(node=TextNode(text=" ", id_="blank"))], query_str=QUERY)
    with pytest.raises(Rank1Error, match="takes NodeWithScore objects; item 0 is str"):
        rerank.postprocess_nodes(["Cats purr."], query_str=QUERY)
    with pytest.raises(Rank1Error, match="top_n must be at least 1"):
        Rank1Rerank(ranker=ranker, top_n=0)


# ---------------------------------------------------------------------------------------------- Haystack


@pytest.fixture(scope="module")
def haystack():
    os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")  # no network from the tests
    return pytest.importorskip("haystack", reason="needs haystack-ai (the [haystack] extra)")


def hs_documents():
    from haystack import Document

    return [Document(id=f"h{i}", content=t, meta={"source": i}, score=1.0 - i / 10) for i, t in enumerate(TEXTS)]


def test_haystack_ranker_scores_and_orders_documents(haystack, ranker, expected):
    from rank1_hf.integrations.haystack import Rank1Ranker

    component = Rank1Ranker(ranker=ranker, top_k=3)
    docs = hs_documents()
    out = component.run(query=QUERY, documents=docs)["documents"]
    assert_ranked([(d.content, d.score) for d in out], expected[:3])
    judged = dict(zip(TEXTS, ranker.judge([(QUERY, t) for t in TEXTS])))
    for d in out:
        assert d.id == f"h{TEXTS.index(d.content)}"
        assert d.meta == {"source": TEXTS.index(d.content), "rank1_reasoning": judged[d.content].reasoning,
                          "rank1_outcome": judged[d.content].outcome}
    assert [d.score for d in docs] == [1.0, 0.9, 0.8, 0.7] and docs[0].meta == {"source": 0}  # inputs untouched
    assert_ranked([(d.content, d.score) for d in component.run(QUERY, docs, top_k=1)["documents"]], expected[:1])
    every = Rank1Ranker(ranker=ranker, top_k=None).run(QUERY, docs)["documents"]
    assert_ranked([(d.content, d.score) for d in every], expected)
    assert component.run(query=QUERY, documents=[]) == {"documents": []}


def test_haystack_ranker_in_a_pipeline(haystack, ranker, expected):
    from haystack import Document, Pipeline, component

    from rank1_hf.integrations.haystack import Rank1Ranker

    @component
    class Retriever:  # a stand-in first stage: every document, worst (by rank1) first
        @component.output_types(documents=list[Document])
        def run(self, query: str):
            order = {t: i for i, (t, _) in enumerate(expected)}
            return {"documents": sorted(hs_documents(), key=lambda d: -order[d.content])}

    pipeline = Pipeline()
    pipeline.add_component("retriever", Retriever())
    pipeline.add_component("ranker", Rank1Ranker(ranker=ranker, top_k=2))
    pipeline.connect("retriever.documents", "ranker.documents")
    result = pipeline.run({"retriever": {"query": QUERY}, "ranker": {"query": QUERY}})
    assert_ranked([(d.content, d.score) for d in result["ranker"]["documents"]], expected[:2])


def test_haystack_reuses_the_store(haystack, tiny, tmp_path, expected):
    from rank1_hf.integrations.haystack import Rank1Ranker

    path = tmp_path / "judgements.sqlite"
    first = Rank1Ranker(ranker=ranker_for(tiny, store=path), top_k=None).run(QUERY, hs_documents())["documents"]
    assert_ranked([(d.content, d.score) for d in first], expected)
    reader = ranker_for(tiny, store=path)
    reader.judge_iter = fail  # type: ignore[method-assign]
    assert Rank1Ranker(ranker=reader, top_k=None).run(QUERY, hs_documents())["documents"] == first
    with pytest.raises(AssertionError, match="judged again"):
        Rank1Ranker(ranker=reader, instruction="be strict").run(QUERY, hs_documents())


def test_haystack_bad_input(haystack, ranker):
    from haystack import Document

    from rank1_hf.integrations.haystack import Rank1Ranker

    component = Rank1Ranker(ranker=ranker)
    with pytest.raises(Rank1Error, match=r"document 'x' \(item 1\) has no text content"):
        component.run(QUERY, [hs_documents()[0], Document(id="x", content=None, meta={"k": 1})])
    with pytest.raises(Rank1Error, match="takes haystack Documents; item 0 is str"):
        component.run(QUERY, ["Cats purr."])
    with pytest.raises(Rank1Error, match="needs a query"):
        component.run("  ", hs_documents())
    with pytest.raises(Rank1Error, match="top_k must be a positive integer"):
        Rank1Ranker(ranker=ranker, top_k=0)
    with pytest.raises(Rank1Error, match="top_k must be a positive integer"):
        component.run(QUERY, hs_documents(), top_k=-1)


# ---------------------------------------------------------------------------------------------- missing packages


@pytest.mark.parametrize("module, package, extra", [("pyterrier", "pyterrier", "pyterrier"),
                                                     ("llamaindex", "llama_index", "llamaindex"),
                                                     ("haystack", "haystack", "haystack")])
def test_missing_package_is_a_clear_error(monkeypatch, module, package, extra):
    monkeypatch.setitem(sys.modules, package, None)
    for name in [n for n in sys.modules if n.startswith(package + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, f"rank1_hf.integrations.{module}", raising=False)
    with pytest.raises(Rank1Error, match=rf"pip install 'rank1-hf\[{extra}\]'"):
        importlib.import_module(f"rank1_hf.integrations.{module}")
