"""The app: :func:`create_app` wires the settings, the judging handler, the routes, the error handlers and
the middlewares around one ready :class:`~rank1_hf.ranker.Rank1`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator

from fastapi import FastAPI

from ..ranker import Rank1
from .errors import AsciiJSONResponse, install_error_handlers
from .handler import Admission, Judger
from .metrics import Metrics
from .middleware import ApiKeyMiddleware, BodyLimitMiddleware, HeadersMiddleware, MetricsMiddleware
from .routes import add_routes
from .settings import ServeSettings

logger = logging.getLogger(__name__)


def _lifespan(ranker: Rank1, health: dict[str, Any]):
    """Warm the engine up in the background (``/health`` says how it went), and at shutdown stop the
    engine and close the store (which folds its WAL back into the file)."""

    def warmed(task: asyncio.Future) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is None:
            health.update(status="ok")
        else:
            logger.error("warm-up failed: %s", error)
            health.update(status="failed", message=f"the engine failed to start: {error}")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        warming = asyncio.ensure_future(asyncio.to_thread(ranker.warmup))
        warming.add_done_callback(warmed)
        try:
            yield
        finally:
            health.update(status="stopping")
            await asyncio.to_thread(ranker.close)
            if ranker.store is not None:
                ranker.store.close()
            logger.info("engine stopped%s", ", store closed" if ranker.store is not None else "")

    return lifespan


def create_app(ranker: Rank1, settings: ServeSettings | None = None) -> FastAPI:
    """The rerank app on ``ranker`` (warmed up at start, closed at shutdown, with its store)."""
    settings = settings or ServeSettings()
    health: dict[str, Any] = {"status": "warming up"}
    admission = Admission(settings.max_queued_pairs)
    metrics = Metrics(ranker, admission)
    judge = Judger(ranker, settings, admission, metrics, health)
    app = FastAPI(title="rank1-hf", summary="rank1 reasoning reranker: Cohere, Jina, vLLM, Infinity and TEI APIs",
                  lifespan=_lifespan(ranker, health), default_response_class=AsciiJSONResponse, redoc_url=None)
    install_error_handlers(app)
    add_routes(app, ranker, settings, judge, metrics, health)
    # Added innermost first: a request meets the headers, then metrics, then the key, then the body limit.
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(HeadersMiddleware)
    return app
