"""vLLM's and Infinity's rerank and score APIs.

- ``POST /rerank`` with ``documents`` (``texts`` makes it TEI's): the body vLLM, Infinity and Jina
  clients send (``query``, ``documents`` as strings or ``{"text"}`` records, ``top_n``,
  ``return_documents``, ``raw_scores``, ``truncate_prompt_tokens``), answered as vLLM answers (``id``,
  ``model``, ``usage``, ``results`` best first), plus Infinity's ``object`` and ``created``.
- ``POST /score`` and ``/v1/score``: ``text_1`` (the query, or one per pair) and ``text_2`` (the
  documents) -> ``data`` in input order.
- ``GET /v1/models`` and Infinity's ``GET /models``: the OpenAI list with the one served model.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import Field

from ..ranker import Judged, best_first
from .errors import HTTPError
from .fields import TRUNCATE_PROMPT_TOKENS, PromptTokens, Query, Rank1Fields, Text, TextRecord
from .results import reasoning, usage


class RerankRequest(Rank1Fields):
    model: str | None = None
    query: Query
    documents: list[Text | TextRecord] = Field(min_length=1)
    top_n: int | None = Field(None, ge=0, strict=True, description="best N results; 0 or absent: all (as vLLM)")
    return_documents: bool = Field(True, description="results carry document.text (vLLM and Jina always do)")
    raw_scores: bool = Field(False, description="relevance_score = true_logit - false_logit instead of P(true)")
    max_tokens_per_doc: int | None = Field(None, ge=1, strict=True)
    truncate_prompt_tokens: PromptTokens | None = TRUNCATE_PROMPT_TOKENS

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class ScoreRequest(Rank1Fields):
    model: str | None = None
    text_1: Query | list[Query] = Field(description="the query, or one query per text_2 entry")
    text_2: Text | list[Text] = Field(description="the documents")
    truncate_prompt_tokens: PromptTokens | None = TRUNCATE_PROMPT_TOKENS

    def pairs(self) -> list[tuple[str, str]]:
        """(query, document) pairs as vLLM pairs them: one query with every document, or one each."""
        queries = [self.text_1] if isinstance(self.text_1, str) else self.text_1
        documents = [self.text_2] if isinstance(self.text_2, str) else self.text_2
        if not queries or not documents:
            raise HTTPError(422, "text_1 and text_2 must not be empty")
        if len(queries) == 1:
            queries = queries * len(documents)
        if len(queries) != len(documents):
            raise HTTPError(422, f"text_1 has {len(queries)} entries and text_2 {len(documents)}: give one "
                                 f"text_1, or as many as text_2")
        return list(zip(queries, documents))


def rerank_response(body: RerankRequest, texts: list[str], judged: Judged, model: str,
                    request_id: str) -> dict[str, Any]:
    js = judged.judgements
    scores = [j.margin if body.raw_scores else j.score for j in js]
    results = []
    for i in best_first(scores)[: body.top_n or None]:
        result: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
        if body.return_documents:
            result["document"] = {"text": texts[i]}
        results.append({**result, **reasoning(js[i], body.return_reasoning)})
    return {"id": request_id, "object": "rerank", "created": int(time.time()), "model": model,
            "usage": usage(js), "results": results}


def score_response(body: ScoreRequest, judged: Judged, model: str, request_id: str) -> dict[str, Any]:
    js = judged.judgements
    data = [{"index": i, "object": "score", "score": j.score, **reasoning(j, body.return_reasoning)}
            for i, j in enumerate(js)]
    return {"id": request_id, "object": "list", "created": int(time.time()), "model": model, "data": data,
            "usage": usage(js)}


def models(model: str, created: int) -> dict[str, Any]:
    """The OpenAI model list (``GET /v1/models``) that gateways probe."""
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "rank1-hf"}]}
