"""rank1 as a LangChain document compressor: rerank retrieved ``Document``s, best first.

    from langchain_classic.retrievers import ContextualCompressionRetriever
    from rank1_hf import Rank1
    from rank1_hf.integrations.langchain import Rank1Compressor

    compressor = Rank1Compressor(ranker=Rank1("jhu-clsp/rank1-7b", store="judgements.sqlite"), top_n=5)
    retriever = ContextualCompressionRetriever(base_compressor=compressor, base_retriever=...)

Each returned document is a copy with ``metadata["relevance_score"]`` (the rank1 score, the key LangChain's
own rerankers use), ``metadata["rank1_reasoning"]`` and ``metadata["rank1_outcome"]``.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..errors import Rank1Error
from ..ranker import best_first

try:
    from langchain_core.callbacks import Callbacks
    from langchain_core.documents import BaseDocumentCompressor, Document
    from pydantic import ConfigDict
except ImportError:  # pragma: no cover - exercised by the test that hides langchain_core
    raise Rank1Error("the LangChain integration needs langchain-core: pip install 'rank1-hf[langchain]'") from None

__all__ = ["Rank1Compressor"]


class Rank1Compressor(BaseDocumentCompressor):
    """Rerank documents with a :class:`~rank1_hf.ranker.Rank1` and keep the ``top_n`` best.

    ranker: the rank1 reranker (give it ``store=`` to keep judgements across restarts).
    top_n: documents returned (None: all of them, reordered).
    instruction: appended to every query the rank1 way (rank1 follows instructions).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    ranker: Any
    top_n: int | None = 3
    instruction: str | None = None

    def compress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        if not documents:
            return []
        return self._best(documents, self.ranker.judge(self._pairs(documents, query)))

    async def acompress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        """As :meth:`compress_documents`, awaiting the ranker's shared engine (no executor thread)."""
        if not documents:
            return []
        return self._best(documents, await self.ranker.ajudge(self._pairs(documents, query)))

    def _pairs(self, documents: Sequence[Document], query: str) -> list[tuple[str, str, str | None]]:
        return [(query, doc.page_content, self.instruction) for doc in documents]

    def _best(self, documents: Sequence[Document], judgements: Sequence[Any]) -> list[Document]:
        out = []
        for i in best_first([j.score for j in judgements])[: self.top_n]:
            j = judgements[i]
            metadata = {**documents[i].metadata, "relevance_score": j.score, "rank1_reasoning": j.reasoning,
                        "rank1_outcome": j.outcome}
            out.append(documents[i].model_copy(update={"metadata": metadata}))
        return out
