"""Hugging Face Text Embeddings Inference's rerank: ``POST /rerank`` with ``texts``, answered with a bare
list, and ``GET /info``. Clients: LlamaIndex's ``TextEmbeddingInference`` postprocessor, TEI clients,
LangChain's and Haystack's TEI rankers."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from .. import __version__
from ..ranker import Judged, Rank1, best_first
from .fields import Query, Rank1Fields, Text
from .results import reasoning
from .settings import ServeSettings


class TEIRequest(Rank1Fields):
    query: Query
    texts: list[Text] = Field(min_length=1)
    return_text: bool = False
    raw_scores: bool = Field(False, description="score = true_logit - false_logit (the margin) instead of P(true)")
    truncate: bool | None = Field(None, description="false: a pair too long for the context is refused (413); "
                                                    "true or absent: its passage is cut")
    truncation_direction: Literal["Left", "Right", "left", "right"] | None = Field(
        None, description="accepted; rank1 always cuts the passage's end, never the template")


def response(body: TEIRequest, judged: Judged) -> list[dict[str, Any]]:
    js = judged.judgements
    scores = [j.margin if body.raw_scores else j.score for j in js]
    results = []
    for i in best_first(scores):
        result: dict[str, Any] = {"index": i, "score": scores[i]}
        if body.return_text:
            result["text"] = body.texts[i]
        results.append({**result, **reasoning(js[i], body.return_reasoning)})
    return results


def info(ranker: Rank1, settings: ServeSettings) -> dict[str, Any]:
    """TEI's ``/info`` fields that apply to a rank1 server."""
    options = ranker.options
    return {
        "model_id": settings.model_name,
        "model_sha": None,
        "model_dtype": str(ranker.model.dtype).removeprefix("torch."),
        "model_type": {"reranker": {"id2label": {"0": "true"}, "label2id": {"true": 0}}},
        "max_input_length": options.context_size - options.max_new_tokens,
        "max_client_batch_size": settings.max_documents,
        "max_batch_requests": options.batch_size,
        "max_concurrent_requests": settings.max_queued_pairs,
        "auto_truncate": True,
        "version": __version__,
        "rank1": {"max_new_tokens": options.max_new_tokens, "context_size": options.context_size,
                  "engine": ranker.core.kind, "dataset_prompt": options.dataset_prompt},
    }
