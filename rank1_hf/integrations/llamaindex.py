"""rank1 as a LlamaIndex node postprocessor: rerank retrieved nodes, best first, sync or async.

    from rank1_hf import Rank1
    from rank1_hf.integrations.llamaindex import Rank1Rerank

    rerank = Rank1Rerank(ranker=Rank1("jhu-clsp/rank1-7b", store="judgements.sqlite"), top_n=5)
    query_engine = index.as_query_engine(similarity_top_k=50, node_postprocessors=[rerank])

Each returned ``NodeWithScore`` has ``score`` the rank1 score and holds a copy of its node whose metadata
gains ``rank1_reasoning`` and ``rank1_outcome`` (both kept out of the text the LLM and the embedder see).
The order is :meth:`Rank1.rank`'s: score descending, ties in input order. ``apostprocess_nodes`` awaits
:meth:`Rank1.ajudge`.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..errors import Rank1Error
from ..ranker import best_first

try:
    from llama_index.core.bridge.pydantic import Field, field_validator
    from llama_index.core.callbacks import CBEventType, EventPayload
    from llama_index.core.postprocessor.types import BaseNodePostprocessor
    from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle
except ImportError:  # pragma: no cover - exercised by the test that hides llama_index
    raise Rank1Error("the LlamaIndex integration needs llama-index-core: pip install 'rank1-hf[llamaindex]'") from None

__all__ = ["Rank1Rerank"]

_KEYS = ("rank1_reasoning", "rank1_outcome")


class Rank1Rerank(BaseNodePostprocessor):
    """Rerank nodes with a :class:`~rank1_hf.ranker.Rank1` and keep the ``top_n`` best.

    ranker: the rank1 reranker (give it ``store=`` to keep judgements across restarts).
    top_n: nodes returned (None: all of them, reordered).
    instruction: appended to every query the rank1 way (rank1 follows instructions).
    metadata_mode: which metadata goes into the passage rank1 reads (default none: the node's text).
    """

    ranker: Any = Field(exclude=True, description="The rank1_hf.Rank1 reranker.")
    top_n: int | None = Field(default=3, description="Nodes returned, best first (None: all).")
    instruction: str | None = Field(default=None, description="Appended to every query the rank1 way.")
    metadata_mode: MetadataMode = Field(default=MetadataMode.NONE, description="Metadata in the passage.")

    @field_validator("top_n")
    @classmethod
    def _positive(cls, top_n: int | None) -> int | None:
        if top_n is not None and top_n < 1:
            raise Rank1Error(f"top_n must be at least 1 (or None for all), got {top_n}")
        return top_n

    @classmethod
    def class_name(cls) -> str:
        return "Rank1Rerank"

    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        pairs = self._pairs(nodes, query_bundle)
        if not pairs:
            return []
        with self._event(nodes, query_bundle) as event:
            out = self._ranked(nodes, self.ranker.judge(pairs))
            event.on_end(payload={EventPayload.NODES: out})
        return out

    async def _apostprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        pairs = self._pairs(nodes, query_bundle)
        if not pairs:
            return []
        with self._event(nodes, query_bundle) as event:
            out = self._ranked(nodes, await self.ranker.ajudge(pairs))
            event.on_end(payload={EventPayload.NODES: out})
        return out

    def _pairs(self, nodes: Sequence[NodeWithScore], query_bundle: QueryBundle | None) -> list[tuple]:
        if not nodes:
            return []
        if query_bundle is None:
            raise Rank1Error("Rank1Rerank needs the query: pass query_str= or query_bundle=")
        pairs = []
        for i, n in enumerate(nodes):
            if not isinstance(n, NodeWithScore):
                raise Rank1Error(f"Rank1Rerank takes NodeWithScore objects; item {i} is {type(n).__name__}")
            text = n.node.get_content(metadata_mode=self.metadata_mode)
            if not text.strip():
                raise Rank1Error(f"node {n.node.node_id!r} (item {i}) has no text to judge")
            pairs.append((query_bundle.query_str, text, self.instruction))
        return pairs

    def _event(self, nodes: Sequence[NodeWithScore], query_bundle: QueryBundle | None) -> Any:
        return self.callback_manager.event(CBEventType.RERANKING, payload={
            EventPayload.NODES: nodes, EventPayload.MODEL_NAME: "rank1",
            EventPayload.QUERY_STR: query_bundle.query_str if query_bundle else None,
            EventPayload.TOP_K: self.top_n})

    def _ranked(self, nodes: Sequence[NodeWithScore], judgements: Sequence[Any]) -> list[NodeWithScore]:
        out = []
        for i in best_first([j.score for j in judgements])[: self.top_n]:
            j, node = judgements[i], nodes[i].node
            copy = node.model_copy(update={
                "metadata": {**node.metadata, "rank1_reasoning": j.reasoning, "rank1_outcome": j.outcome},
                "excluded_llm_metadata_keys": _with(node.excluded_llm_metadata_keys),
                "excluded_embed_metadata_keys": _with(node.excluded_embed_metadata_keys)})
            out.append(NodeWithScore(node=copy, score=j.score))
        return out


def _with(keys: list[str]) -> list[str]:
    return [*keys, *(k for k in _KEYS if k not in keys)]
