"""The routes: each parses its API family's body, asks the judging handler, and shapes the answer."""

from __future__ import annotations

import time
from typing import Any

import pydantic
from fastapi import Body, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..ranker import Rank1
from . import cohere, tei, vllm
from .errors import AsciiJSONResponse, HTTPError, validation_message
from .handler import Cuts, Judger
from .metrics import Metrics
from .settings import ServeSettings


def add_routes(app: FastAPI, ranker: Rank1, settings: ServeSettings, judge: Judger, metrics: Metrics,
               health: dict[str, Any]) -> None:
    model = settings.model_name
    started = int(time.time())

    @app.post("/v2/rerank", summary="Cohere v2 rerank")
    async def rerank_v2(body: cohere.CohereV2Request, request: Request) -> dict[str, Any]:
        judged = await judge(request, body, [(body.query, d) for d in body.documents],
                             Cuts(body.max_tokens_per_doc, body.truncate_prompt_tokens))
        return cohere.v2_response(body, judged, model, request.state.request_id)

    @app.post("/v1/rerank", summary="Cohere v1 / Jina / vLLM rerank")
    async def rerank_v1(body: cohere.CohereV1Request, request: Request) -> dict[str, Any]:
        judged = await judge(request, body, [(body.query, t) for t in cohere.v1_texts(body)],
                             Cuts(body.max_tokens_per_doc, body.truncate_prompt_tokens))
        return cohere.v1_response(body, judged, model, request.state.request_id)

    @app.post("/rerank", summary="TEI rerank (with texts) or vLLM / Infinity / Jina rerank (with documents)",
              description="A body with `texts` is TEI's (answered with a bare list); a body with `documents` is "
                          "vLLM's, Infinity's or Jina's (answered with `results`). See the TEIRequest and "
                          "RerankRequest schemas.")
    async def rerank(request: Request, body: dict[str, Any] = Body()) -> Any:
        if ("texts" in body) == ("documents" in body):
            raise HTTPError(422, "give either texts (TEI's rerank) or documents (vLLM's, Infinity's or Jina's), "
                                 "not both" if "texts" in body else "texts: Field required (TEI's rerank), or "
                                 "documents (vLLM's, Infinity's or Jina's)")
        if "texts" in body:
            tei_body = _parse(tei.TEIRequest, body)
            judged = await judge(request, tei_body, [(tei_body.query, t) for t in tei_body.texts],
                                 Cuts(refuse_cut=tei_body.truncate is False, field="texts"))
            return tei.response(tei_body, judged)
        vllm_body = _parse(vllm.RerankRequest, body)
        texts = vllm_body.texts()
        judged = await judge(request, vllm_body, [(vllm_body.query, t) for t in texts],
                             Cuts(vllm_body.max_tokens_per_doc, vllm_body.truncate_prompt_tokens))
        return vllm.rerank_response(vllm_body, texts, judged, model, request.state.request_id)

    async def score(body: vllm.ScoreRequest, request: Request) -> dict[str, Any]:
        judged = await judge(request, body, body.pairs(), Cuts(prompt_tokens=body.truncate_prompt_tokens,
                                                               field="text_2"))
        return vllm.score_response(body, judged, model, request.state.request_id)

    app.post("/score", summary="vLLM score")(score)
    app.post("/v1/score", summary="vLLM score")(score)

    async def models() -> dict[str, Any]:
        return vllm.models(model, started)

    app.get("/v1/models", summary="the served model (OpenAI list)")(models)
    app.get("/models", summary="the served model (Infinity)")(models)

    @app.get("/info", summary="what this server is (TEI's /info)")
    async def info() -> dict[str, Any]:
        return tei.info(ranker, settings)

    @app.get("/health", summary="200 once the model is loaded and its engine warm")
    async def healthy() -> AsciiJSONResponse:
        if health["status"] != "ok":
            return AsciiJSONResponse(health, status_code=503)
        return AsciiJSONResponse({"status": "ok", "model": model, "engine": ranker.core.worker.engine_name})

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)


def _parse(model: type[pydantic.BaseModel], body: dict[str, Any]) -> Any:
    """``body`` validated as ``model``; a 422 naming each bad field otherwise."""
    try:
        return model.model_validate(body)
    except pydantic.ValidationError as error:
        raise HTTPError(*validation_message(list(error.errors()))) from None
