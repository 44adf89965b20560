"""rank1 as a ``rerankers`` ranker (the unified reranking API of answerdotai/rerankers).

    from rank1_hf.integrations.rerankers import Rank1Ranker

    ranker = Rank1Ranker("jhu-clsp/rank1-7b", store="judgements.sqlite")   # or Rank1Ranker.from_ranker(Rank1(...))
    results = ranker.rank("what is a cat", ["Cats are felines.", "Dogs bark."], doc_ids=["a", "b"])
    results.top_k(1)[0].document.text, results.top_k(1)[0].score

``rerankers.Reranker("jhu-clsp/rank1-7b")`` itself does not know rank1 (it builds a sequence classifier
with an untrained head): use this class instead. Each result's document metadata gains
``rank1_reasoning`` and ``rank1_outcome``.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..errors import Rank1Error
from ..ranker import Rank1, best_first

try:
    from rerankers.documents import Document
    from rerankers.models.ranker import BaseRanker
    from rerankers.results import RankedResults, Result
except ImportError:  # pragma: no cover - exercised by the test that hides rerankers
    raise Rank1Error("the rerankers integration needs rerankers: pip install 'rank1-hf[rerankers]'") from None

__all__ = ["Rank1Ranker"]


class Rank1Ranker(BaseRanker):
    """A rerankers ``BaseRanker`` over :class:`~rank1_hf.ranker.Rank1`.

    model_name_or_path, options: as :class:`Rank1` takes them (``store=``, ``dtype``, ``max_new_tokens``, ...).
    instruction: appended to every query the rank1 way.
    """

    def __init__(self, model_name_or_path: str, verbose: int = 1, *, instruction: str | None = None,
                 **options: Any) -> None:
        self.ranker = Rank1(model_name_or_path, **options)
        self.verbose, self.instruction = verbose, instruction

    @classmethod
    def from_ranker(cls, ranker: Rank1, instruction: str | None = None) -> "Rank1Ranker":
        """Wrap a ready :class:`Rank1`."""
        self = cls.__new__(cls)
        self.ranker, self.verbose, self.instruction = ranker, 1, instruction
        return self

    def score(self, query: str, doc: str) -> float:
        """The rank1 score of one (query, passage) pair."""
        return self.ranker.judge([(query, doc, self.instruction)])[0].score

    def rank(
        self,
        query: str,
        docs: str | Sequence[str] | Document | Sequence[Document],
        doc_ids: Sequence[str] | Sequence[int] | None = None,
        metadata: Sequence[dict] | None = None,
    ) -> RankedResults:
        """All documents, best first, with scores and 1-based ranks."""
        documents = _documents(docs, doc_ids, metadata)
        judgements = self.ranker.judge([(query, d.text, self.instruction) for d in documents])
        return _ranked(query, documents, judgements)

    async def rank_async(
        self,
        query: str,
        docs: str | Sequence[str] | Document | Sequence[Document],
        doc_ids: Sequence[str] | Sequence[int] | None = None,
        metadata: Sequence[dict] | None = None,
    ) -> RankedResults:
        """:meth:`rank`, awaiting the ranker's shared engine (no executor thread)."""
        documents = _documents(docs, doc_ids, metadata)
        judgements = await self.ranker.ajudge([(query, d.text, self.instruction) for d in documents])
        return _ranked(query, documents, judgements)


def _ranked(query: str, documents: list[Document], judgements: Sequence[Any]) -> RankedResults:
    results = []
    for rank, i in enumerate(best_first([j.score for j in judgements]), 1):
        d, j = documents[i], judgements[i]
        d.metadata = {**d.metadata, "rank1_reasoning": j.reasoning, "rank1_outcome": j.outcome}
        results.append(Result(document=d, score=j.score, rank=rank))
    return RankedResults(results=results, query=query, has_scores=True)


def _documents(docs: Any, doc_ids: Any, metadata: Any) -> list[Document]:
    """rerankers Documents for strings or Documents (ids default to 0..n-1, as rerankers does)."""
    items = [docs] if isinstance(docs, (str, Document)) else list(docs)
    if doc_ids is not None and len(doc_ids) != len(items):
        raise Rank1Error(f"{len(items)} documents but {len(doc_ids)} doc_ids")
    out = []
    for i, item in enumerate(items):
        doc_id = doc_ids[i] if doc_ids is not None else getattr(item, "doc_id", None)
        meta = metadata[i] if metadata is not None else getattr(item, "metadata", None)
        text = item.text if isinstance(item, Document) else item
        out.append(Document(text=text, doc_id=i if doc_id is None else doc_id, metadata=dict(meta or {})))
    return out
