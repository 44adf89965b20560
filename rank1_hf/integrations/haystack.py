"""rank1 as a Haystack ranker component: rerank retrieved ``Document``s, best first, in a ``Pipeline``.

    from haystack import Pipeline
    from rank1_hf import Rank1
    from rank1_hf.integrations.haystack import Rank1Ranker

    pipeline = Pipeline()
    pipeline.add_component("retriever", InMemoryBM25Retriever(document_store, top_k=50))
    pipeline.add_component("ranker", Rank1Ranker(ranker=Rank1("jhu-clsp/rank1-7b", store="judgements.sqlite"), top_k=5))
    pipeline.connect("retriever.documents", "ranker.documents")
    pipeline.run({"retriever": {"query": q}, "ranker": {"query": q}})["ranker"]["documents"]

Each returned document is a copy with ``score`` the rank1 score and ``meta`` gaining ``rank1_reasoning``
and ``rank1_outcome``. The order is :meth:`Rank1.rank`'s: score descending, ties in input order.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import Rank1Error
from ..ranker import best_first

try:
    from haystack import Document, component
except ImportError:  # pragma: no cover - exercised by the test that hides haystack
    raise Rank1Error("the Haystack integration needs haystack-ai: pip install 'rank1-hf[haystack]'") from None

__all__ = ["Rank1Ranker"]


@component
class Rank1Ranker:
    """Rerank documents with a :class:`~rank1_hf.ranker.Rank1` and keep the ``top_k`` best.

    ranker: the rank1 reranker (give it ``store=`` to keep judgements across restarts).
    top_k: documents returned (None: all of them, reordered); ``run(top_k=...)`` overrides it per call.
    instruction: appended to every query the rank1 way (rank1 follows instructions).
    """

    def __init__(self, ranker: Any, top_k: int | None = 10, instruction: str | None = None) -> None:
        self.ranker, self.top_k, self.instruction = ranker, _checked_top_k(top_k), instruction

    @component.output_types(documents=list[Document])
    def run(self, query: str, documents: list[Document], top_k: int | None = None) -> dict[str, list[Document]]:
        """The documents best first, each with its rank1 score, cut to ``top_k`` (default: the component's)."""
        top_k = self.top_k if top_k is None else _checked_top_k(top_k)
        if not documents:
            return {"documents": []}
        if not isinstance(query, str) or not query.strip():
            raise Rank1Error(f"Rank1Ranker needs a query, got {query!r}")
        pairs = []
        for i, doc in enumerate(documents):
            if not isinstance(doc, Document):
                raise Rank1Error(f"Rank1Ranker takes haystack Documents; item {i} is {type(doc).__name__}")
            if not isinstance(doc.content, str) or not doc.content.strip():
                raise Rank1Error(f"document {doc.id!r} (item {i}) has no text content to judge")
            pairs.append((query, doc.content, self.instruction))
        judgements = self.ranker.judge(pairs)
        out = []
        for i in best_first([j.score for j in judgements])[:top_k]:
            j, doc = judgements[i], documents[i]
            meta = {**doc.meta, "rank1_reasoning": j.reasoning, "rank1_outcome": j.outcome}
            out.append(dataclasses.replace(doc, score=j.score, meta=meta))
        return {"documents": out}


def _checked_top_k(top_k: int | None) -> int | None:
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise Rank1Error(f"top_k must be a positive integer (or None for all), got {top_k!r}")
    return top_k
