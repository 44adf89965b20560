"""An HTTP rerank server on one :class:`~rank1_hf.ranker.Rank1`: the Cohere, Jina/vLLM and TEI shapes.

:func:`create_app` takes a ready ranker and :class:`ServeSettings` and returns a FastAPI app:

- ``POST /v2/rerank`` (Cohere v2), ``POST /v1/rerank`` (Cohere v1, Jina, vLLM), ``POST /rerank`` (TEI);
  every route also takes rank1's own ``instruction``, ``dataset_prompt`` and ``return_reasoning``;
- ``GET /health`` (200 once the engine is warm), ``GET /metrics`` (Prometheus text), ``/docs`` (OpenAPI).

Every request feeds the ranker's one long-lived engine through :meth:`Rank1.ajudge_with_stats`, so
concurrent requests share decode steps, identical pairs in flight are judged once, and with a store each
judgement is committed as it is made. A request whose client disconnects is cancelled, which frees its
waiting pairs. Bad input gets a 4xx JSON body ``{"message": ...}``; a full queue gets 503 with Retry-After.

The request-wide rules are small ASGI middlewares, one concern each (outermost first): metrics, API key,
body size limit. ``rank1-hf serve`` (:mod:`rank1_hf.cli.serve`) builds the ranker and runs this app.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Literal, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, Field, field_validator

from .dataset_prompts import resolve_dataset_prompt
from .errors import Rank1Error
from .judgement import Judgement
from .judging import cut_at_tokens
from .options import check_count
from .ranker import Judged, Rank1, best_first

logger = logging.getLogger(__name__)

__all__ = ["ServeSettings", "create_app"]

#: The rerank routes (the ones that need the API key, are counted and timed).
RERANK_ROUTES = ("/v2/rerank", "/v1/rerank", "/rerank")
#: Routes open without the API key: a load balancer's probe and the API's description.
OPEN_ROUTES = ("/health", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc")
#: Seconds a client told "queue full" (503) is asked to wait before trying again.
RETRY_AFTER_S = 1
#: Request latency buckets, seconds: reasoning takes from milliseconds (stored) to minutes (long traces).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


@dataclass(frozen=True)
class ServeSettings:
    """What the server enforces besides the ranker's own options.

    api_key: requests to the rerank routes and /metrics need ``Authorization: Bearer <api_key>``
        (None: no key).
    model_name: the name the responses give for the model.
    max_documents: most documents in one request (more: 413).
    max_queued_pairs: most pairs accepted and not yet answered, all requests together (more: 503).
    max_body_bytes: largest request body (more: 413); 16 MiB by default.
    """

    api_key: str | None = None
    model_name: str = "rank1"
    max_documents: int = 1000
    max_queued_pairs: int = 8192
    max_body_bytes: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("max_documents", "max_queued_pairs", "max_body_bytes"):
            check_count(name, getattr(self, name), optional=False)
        if self.max_queued_pairs < self.max_documents:
            raise Rank1Error(f"max_queued_pairs ({self.max_queued_pairs}) must be at least max_documents "
                             f"({self.max_documents}), or a full request could never be accepted")


# ---------------------------------------------------------------------------------------------- requests


class Rank1Fields(BaseModel):
    """rank1's own fields, on every rerank route."""

    instruction: str | None = Field(None, description="joined to the query the rank1 way")
    dataset_prompt: str | None = Field(
        None, description="a template containing FILL_QUERY_HERE, or the name of an official rank1 prompt "
                          "(e.g. SciFact, bright-biology); default: the server's --dataset-prompt")
    return_reasoning: bool = Field(False, description="add reasoning, outcome and reasoning_tokens to each result")

    @field_validator("query", check_fields=False)
    @classmethod
    def _query_not_empty(cls, query: str) -> str:
        if not query.strip():
            raise ValueError("query must not be empty")
        return query


class TextRecord(BaseModel):
    """A document given as a record (Cohere v1, Jina): its ``text`` is what is judged."""

    text: str


class CohereV2Request(Rank1Fields):
    model: str | None = Field(None, description="echoed; the server judges with its own model")
    query: str
    documents: list[str] = Field(min_length=1)
    top_n: int | None = Field(None, ge=1, strict=True)
    max_tokens_per_doc: int | None = Field(None, ge=1, strict=True,
                                           description="cut each document to this many tokens first")


class CohereV1Request(Rank1Fields):
    model: str | None = None
    query: str
    documents: list[str | TextRecord] = Field(min_length=1)
    top_n: int | None = Field(None, ge=1, strict=True)
    return_documents: bool = False
    max_tokens_per_doc: int | None = Field(None, ge=1, strict=True)


class TEIRequest(Rank1Fields):
    query: str
    texts: list[str] = Field(min_length=1)
    return_text: bool = False
    raw_scores: bool = Field(False, description="score = true_logit - false_logit (the margin) instead of P(true)")
    truncate: bool = Field(False, description="accepted; passages too long for the context are always cut "
                                              "(the passage only)")
    truncation_direction: Literal["Left", "Right", "left", "right"] | None = None


class HTTPError(Exception):
    """An error answered as ``status`` with ``{"message": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


# ---------------------------------------------------------------------------------------------- metrics


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several apps may live in one process)."""

    def __init__(self, ranker: Rank1, admission: "Admission"):
        self.registry = CollectorRegistry()
        self.requests = Counter("rank1_requests", "HTTP requests to the rerank routes", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("rank1_request_duration_seconds", "Rerank request latency", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.pairs_requested = Counter("rank1_pairs_requested", "Pairs in answered rerank requests",
                                       registry=self.registry)
        self.stored = 0  # pairs answered from the store or an identical pair in the same request
        self.registry.register(_EngineCollector(ranker, admission, self))

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Counts read from the engine's worker and the admission counter when /metrics is scraped."""

    def __init__(self, ranker: Rank1, admission: "Admission", metrics: Metrics):
        self.ranker, self.admission, self.metrics = ranker, admission, metrics

    def collect(self):
        worker = self.ranker.core.worker
        yield CounterMetricFamily("rank1_pairs_judged", "Pairs the engine judged (each distinct pair in flight once)",
                                  value=worker.judged)
        yield CounterMetricFamily("rank1_pairs_reused", "Pairs answered without judging: from the store, or from "
                                  "an identical pair in flight", value=self.metrics.stored + worker.joined)
        yield CounterMetricFamily("rank1_generated_tokens", "Reasoning tokens generated by the engine",
                                  value=worker.stats.generated_tokens)
        yield CounterMetricFamily("rank1_prefill_tokens", "Prompt tokens run by the engine",
                                  value=worker.stats.prefill_tokens)
        yield GaugeMetricFamily("rank1_pairs_queued", "Pairs accepted and not yet answered (the --max-queued-pairs "
                                "limit counts these)", value=self.admission.queued)
        yield GaugeMetricFamily("rank1_engine_pending_prompts", "Distinct prompts waiting for or in the engine",
                                value=worker.pending_prompts())


# ---------------------------------------------------------------------------------------------- middleware


async def _send_json(send: Callable, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    """Answer a raw ASGI request with a JSON body (for the middlewares, which run before FastAPI)."""
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


class MetricsMiddleware:
    """Counts rerank requests by route and status, and times them (401 and 413 included)."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        route = scope.get("path") if scope["type"] == "http" else None
        if route not in RERANK_ROUTES:
            return await self.app(scope, receive, send)
        started, status = time.monotonic(), [500]

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.monotonic() - started)


class ApiKeyMiddleware:
    """``Authorization: Bearer <key>`` on every route but :data:`OPEN_ROUTES`, compared in constant time."""

    def __init__(self, app: Any, api_key: str):
        self.app, self.expected = app, api_key.encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_ROUTES or self._allowed(scope):
            return await self.app(scope, receive, send)
        await _send_json(send, 401, {"message": "missing or wrong API key: send 'Authorization: Bearer <key>'"},
                         {"WWW-Authenticate": "Bearer"})

    def _allowed(self, scope: dict) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.expected)


class BodyLimitMiddleware:
    """Reads the request body up to ``limit`` bytes (413 beyond it), then hands it on to the app; later
    reads (the app waiting for a disconnect) go to the connection."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._too_large(send)
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed() -> dict:
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)

    async def _too_large(self, send: Callable) -> None:
        await _send_json(send, 413, {"message": f"request body over the limit of {self.limit} bytes "
                                                f"(--max-body-bytes)"})


# ---------------------------------------------------------------------------------------------- judging


class Admission:
    """The queue limit: pairs accepted and not yet answered, all requests together."""

    def __init__(self, limit: int):
        self.limit, self.queued = limit, 0

    @contextlib.contextmanager
    def admit(self, pairs: int):
        if self.queued + pairs > self.limit:
            raise HTTPError(503, f"queue full: {self.queued} pairs waiting (--max-queued-pairs {self.limit}); "
                                 f"retry later", {"Retry-After": str(RETRY_AFTER_S)})
        self.queued += pairs
        try:
            yield
        finally:
            self.queued -= pairs


async def _until_disconnected(request: Request) -> None:
    """Returns once the client has gone (the body is already read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[Judged]) -> Judged:
    """``work``'s result, or cancel it (freeing its waiting pairs) when the client disconnects first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, gone):
            if not pending.done():
                pending.cancel()
    if not task.done() or task.cancelled():
        logger.info("client disconnected: its request was cancelled")
        raise HTTPError(499, "client disconnected")
    return task.result()


def _cut_to_tokens(tokenizer: Any, texts: Sequence[str], limit: int | None) -> list[str]:
    """Each text cut to its first ``limit`` tokens (Cohere's ``max_tokens_per_doc``), at a token boundary."""
    if limit is None:
        return list(texts)
    out = []
    for text in texts:
        out.append(cut_at_tokens(tokenizer, text, limit))
    return out


class Judger:
    """Turns a request's query and documents into judgements on the ranker: admission, the request's
    dataset prompt, cancellation on disconnect, and the metrics of what it judged."""

    def __init__(self, ranker: Rank1, settings: ServeSettings, admission: Admission, metrics: Metrics):
        self.ranker, self.settings, self.admission, self.metrics = ranker, settings, admission, metrics

    async def __call__(self, request: Request, body: Rank1Fields, query: str, texts: list[str],
                       max_tokens: int | None = None) -> Judged:
        if len(texts) > self.settings.max_documents:
            raise HTTPError(413, f"{len(texts)} documents: at most {self.settings.max_documents} per request "
                                 f"(--max-documents)")
        try:
            dataset_prompt = resolve_dataset_prompt(body.dataset_prompt)
        except Rank1Error as error:
            raise HTTPError(422, str(error)) from None
        with self.admission.admit(len(texts)):
            texts = await asyncio.to_thread(_cut_to_tokens, self.ranker.tokenizer, texts, max_tokens)
            pairs = [(query, text, body.instruction) for text in texts]
            try:
                judged = await _unless_disconnected(
                    request, self.ranker.ajudge_with_stats(pairs, dataset_prompt=dataset_prompt))
            except Rank1Error as error:  # e.g. a query too long for the context
                raise HTTPError(422, str(error)) from None
        self.metrics.pairs_requested.inc(len(pairs))
        self.metrics.stored += judged.reused
        return judged


# ---------------------------------------------------------------------------------------------- responses


def _reasoning(judgement: Judgement, wanted: bool) -> dict[str, Any]:
    """rank1's per-result extras, when ``return_reasoning`` asked for them."""
    if not wanted:
        return {}
    return {"reasoning": judgement.reasoning, "outcome": judgement.outcome,
            "reasoning_tokens": judgement.reasoning_tokens}


def _cohere_meta(judged: Judged, version: str) -> dict[str, Any]:
    js = judged.judgements
    return {"api_version": {"version": version},
            "billed_units": {"search_units": math.ceil(len(js) / 100)},
            "tokens": {"input_tokens": sum(j.prompt_tokens for j in js),
                       "output_tokens": sum(j.reasoning_tokens for j in js)},
            "rank1": {"pairs_reused": judged.reused}}


def cohere_v2_response(body: CohereV2Request, judged: Judged, model: str) -> dict[str, Any]:
    js = judged.judgements
    results = [{"index": i, "relevance_score": js[i].score, **_reasoning(js[i], body.return_reasoning)}
               for i in best_first([j.score for j in js])[: body.top_n]]
    return {"id": str(uuid.uuid4()), "model": model, "results": results, "meta": _cohere_meta(judged, "2")}


def cohere_v1_response(body: CohereV1Request, texts: list[str], judged: Judged, model: str) -> dict[str, Any]:
    js = judged.judgements
    results = []
    for i in best_first([j.score for j in js])[: body.top_n]:
        result: dict[str, Any] = {"index": i, "relevance_score": js[i].score}
        if body.return_documents:
            result["document"] = {"text": texts[i]}
        results.append({**result, **_reasoning(js[i], body.return_reasoning)})
    return {"id": str(uuid.uuid4()), "model": model, "results": results, "meta": _cohere_meta(judged, "1"),
            "usage": {"total_tokens": sum(j.prompt_tokens + j.reasoning_tokens for j in js)}}


def tei_response(body: TEIRequest, judged: Judged) -> list[dict[str, Any]]:
    js = judged.judgements
    scores = [j.margin if body.raw_scores else j.score for j in js]
    results = []
    for i in best_first(scores):
        result: dict[str, Any] = {"index": i, "score": scores[i]}
        if body.return_text:
            result["text"] = body.texts[i]
        results.append({**result, **_reasoning(js[i], body.return_reasoning)})
    return results


# ---------------------------------------------------------------------------------------------- the app


def _validation_message(error: RequestValidationError) -> tuple[int, str]:
    """(status, one readable line) for a body FastAPI could not parse or validate: 400 for bad JSON."""
    errors = error.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "invalid JSON body"
    if any(isinstance(e.get("input"), bytes) for e in errors):  # a body sent as another content type
        return 400, "the body must be a JSON object, sent with Content-Type: application/json"
    parts = []
    for e in errors:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return 422, "; ".join(parts)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, error: HTTPError) -> JSONResponse:
        return JSONResponse({"message": error.message}, status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        status, message = _validation_message(error)
        return JSONResponse({"message": message, "detail": json.loads(json.dumps(error.errors(), default=str))},
                            status_code=status)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("request failed")
        return JSONResponse({"message": f"internal error: {type(error).__name__}: {error}"}, status_code=500)


def _lifespan(ranker: Rank1, settings: ServeSettings, state: dict[str, bool]):
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        warming = asyncio.ensure_future(asyncio.to_thread(ranker.warmup))
        warming.add_done_callback(lambda task: state.update(ready=not task.cancelled() and task.exception() is None))
        try:
            yield
        finally:
            state["ready"] = False
            await asyncio.to_thread(ranker.close)
            if ranker.store is not None:
                ranker.store.close()
            logger.info("engine stopped%s", ", store closed" if ranker.store is not None else "")

    return lifespan


def create_app(ranker: Rank1, settings: ServeSettings | None = None) -> FastAPI:
    """The rerank app on ``ranker`` (warmed up at start, closed at shutdown, with its store)."""
    settings = settings or ServeSettings()
    state = {"ready": False}
    admission = Admission(settings.max_queued_pairs)
    metrics = Metrics(ranker, admission)
    judge = Judger(ranker, settings, admission, metrics)
    model = settings.model_name
    app = FastAPI(title="rank1-hf", summary="rank1 reasoning reranker: Cohere, Jina/vLLM and TEI rerank APIs",
                  lifespan=_lifespan(ranker, settings, state))
    _install_error_handlers(app)

    @app.post("/v2/rerank", summary="Cohere v2 rerank")
    async def rerank_v2(body: CohereV2Request, request: Request) -> dict[str, Any]:
        judged = await judge(request, body, body.query, body.documents, body.max_tokens_per_doc)
        return cohere_v2_response(body, judged, model)

    @app.post("/v1/rerank", summary="Cohere v1 / Jina / vLLM rerank")
    async def rerank_v1(body: CohereV1Request, request: Request) -> dict[str, Any]:
        texts = [d if isinstance(d, str) else d.text for d in body.documents]
        judged = await judge(request, body, body.query, texts, body.max_tokens_per_doc)
        return cohere_v1_response(body, texts, judged, model)

    @app.post("/rerank", summary="Text Embeddings Inference (TEI) rerank")
    async def rerank_tei(body: TEIRequest, request: Request) -> list[dict[str, Any]]:
        return tei_response(body, await judge(request, body, body.query, body.texts))

    @app.get("/health", summary="200 once the model is loaded and its engine warm")
    async def health() -> JSONResponse:
        if not state["ready"]:
            return JSONResponse({"status": "warming up"}, status_code=503)
        return JSONResponse({"status": "ok", "model": model, "engine": ranker.core.worker.engine_name})

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
