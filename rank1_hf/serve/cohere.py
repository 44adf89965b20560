"""Cohere's rerank API: ``POST /v2/rerank`` (v2) and ``POST /v1/rerank`` (v1, the shape Jina's API and
vLLM's ``/v1/rerank`` also send). Clients: the Cohere SDK (``cohere.ClientV2`` / ``cohere.Client``),
LangChain's and LlamaIndex's CohereRerank, LiteLLM, Jina clients."""

from __future__ import annotations

import json
import math
from typing import Any

from pydantic import Field

from ..ranker import Judged, best_first
from .errors import HTTPError
from .fields import TRUNCATE_PROMPT_TOKENS, PromptTokens, Query, Rank1Fields, Record, Text
from .results import reasoning


class CohereV2Request(Rank1Fields):
    model: str | None = Field(None, description="echoed as the server's own model name; not checked")
    query: Query
    documents: list[Text] = Field(min_length=1)
    top_n: int | None = Field(None, ge=1, strict=True)
    max_tokens_per_doc: int | None = Field(None, ge=1, strict=True,
                                           description="cut each document to this many tokens first")
    truncate_prompt_tokens: PromptTokens | None = TRUNCATE_PROMPT_TOKENS


class CohereV1Request(Rank1Fields):
    model: str | None = None
    query: Query
    documents: list[Text | Record] = Field(min_length=1, description="strings, or records (their 'text', or "
                                                                     "the rank_fields)")
    rank_fields: list[Text] | None = Field(None, min_length=1,
                                           description="the record fields judged, joined as 'field: value' lines")
    top_n: int | None = Field(None, ge=1, strict=True)
    return_documents: bool = False
    max_tokens_per_doc: int | None = Field(None, ge=1, strict=True)
    truncate_prompt_tokens: PromptTokens | None = TRUNCATE_PROMPT_TOKENS


def v1_texts(body: CohereV1Request) -> list[str]:
    """The text judged for each document: a string as given; a record's ``text``, or with ``rank_fields``
    its named fields in that order as ``field: value`` lines (the fields a record lacks are left out)."""
    texts = []
    for i, document in enumerate(body.documents):
        if isinstance(document, str):
            texts.append(document)
        elif body.rank_fields is None:
            if not isinstance(document.get("text"), str):
                raise HTTPError(422, f"documents.{i}: a record needs a string 'text' (or name its fields in "
                                     f"rank_fields)")
            texts.append(document["text"])
        else:
            lines = [f"{name}: {_field_text(document[name])}" for name in body.rank_fields if name in document]
            if not lines:
                raise HTTPError(422, f"documents.{i}: has none of the rank_fields {body.rank_fields}")
            texts.append("\n".join(lines))
    return texts


def _field_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _meta(judged: Judged, version: str) -> dict[str, Any]:
    js = judged.judgements
    return {"api_version": {"version": version},
            "billed_units": {"search_units": math.ceil(len(js) / 100)},
            "tokens": {"input_tokens": sum(j.prompt_tokens for j in js),
                       "output_tokens": sum(j.reasoning_tokens for j in js)},
            "rank1": {"pairs_reused": judged.reused}}


def v2_response(body: CohereV2Request, judged: Judged, model: str, request_id: str) -> dict[str, Any]:
    js = judged.judgements
    results = [{"index": i, "relevance_score": js[i].score, **reasoning(js[i], body.return_reasoning)}
               for i in best_first([j.score for j in js])[: body.top_n]]
    return {"id": request_id, "model": model, "results": results, "meta": _meta(judged, "2")}


def v1_response(body: CohereV1Request, judged: Judged, model: str, request_id: str) -> dict[str, Any]:
    js = judged.judgements
    results = []
    for i in best_first([j.score for j in js])[: body.top_n]:
        result: dict[str, Any] = {"index": i, "relevance_score": js[i].score}
        if body.return_documents:  # as given: a record comes back whole, a string as {"text"}
            document = body.documents[i]
            result["document"] = {"text": document} if isinstance(document, str) else document
        results.append({**result, **reasoning(js[i], body.return_reasoning)})
    return {"id": request_id, "model": model, "results": results, "meta": _meta(judged, "1"),
            "usage": {"total_tokens": sum(j.prompt_tokens + j.reasoning_tokens for j in js)}}
