"""The request-wide rules, one small ASGI middleware each (outermost first, as :func:`~.app.create_app`
adds them): request id and timing headers, metrics, API key, body size limit. They run before FastAPI,
so each answers its own errors in the server's ``{"message"}`` shape."""

from __future__ import annotations

import hmac
import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from .metrics import Metrics

#: The judging routes: counted and timed by route in /metrics.
JUDGING_ROUTES = ("/v2/rerank", "/v1/rerank", "/rerank", "/score", "/v1/score")
#: Routes open without the API key: a load balancer's probe and the API's description.
OPEN_ROUTES = ("/health", "/docs", "/docs/oauth2-redirect", "/openapi.json")
#: A client's x-request-id is echoed when it is this plain; anything else gets a fresh id.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


async def send_json(send: Callable, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    """Answer a raw ASGI request with a JSON body (for the middlewares, which run before FastAPI)."""
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


def _header(scope: dict, name: bytes) -> bytes | None:
    return dict(scope.get("headers") or []).get(name)


@dataclass
class Timing:
    """One request's clock: set by :class:`HeadersMiddleware`, the judging part by the handler."""

    started: float
    judging: float | None = None  # when the judging call began
    judged: float | None = None  # when it returned

    def headers(self, now: float) -> list[tuple[bytes, bytes]]:
        """TEI's timing headers, in whole milliseconds: x-total-time always; on a judged request
        x-queue-time (arrival to the judging call: reading, checks, admission, cuts), x-inference-time
        (the judging call, the engine's own queue included) and x-compute-time (the two together)."""
        out = [(b"x-total-time", _ms(now - self.started))]
        if self.judging is not None and self.judged is not None:
            out += [(b"x-queue-time", _ms(self.judging - self.started)),
                    (b"x-inference-time", _ms(self.judged - self.judging)),
                    (b"x-compute-time", _ms(self.judged - self.started))]
        return out


def _ms(seconds: float) -> bytes:
    return str(round(seconds * 1000)).encode()


class HeadersMiddleware:
    """Every response carries ``x-request-id`` (the client's, echoed, or a new one) and the timing headers;
    the id and clock are in ``scope["state"]`` for the handler (the response ``id`` is the request id)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = (_header(scope, b"x-request-id") or b"").decode("latin-1")
        request_id = given if _REQUEST_ID.fullmatch(given) else str(uuid.uuid4())
        timing = Timing(time.monotonic())
        state = scope.setdefault("state", {})
        state["request_id"], state["timing"] = request_id, timing

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (b"x-request-id", request_id.encode()),
                           *timing.headers(time.monotonic())]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, sending)


class MetricsMiddleware:
    """Counts judging requests by route and status, and times them (401 and 413 included)."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        route = scope.get("path") if scope["type"] == "http" else None
        if route not in JUDGING_ROUTES:
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
    """``Authorization: Bearer <key>`` on every route but :data:`OPEN_ROUTES`, the whole token compared to the
    whole key in constant time (an empty or partial token fails)."""

    def __init__(self, app: Any, api_key: str):
        self.app, self.expected = app, api_key.encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_ROUTES or self._allowed(scope):
            return await self.app(scope, receive, send)
        await send_json(send, 401, {"message": "missing or wrong API key: send 'Authorization: Bearer <key>'"},
                        {"WWW-Authenticate": "Bearer"})

    def _allowed(self, scope: dict) -> bool:
        scheme, _, token = (_header(scope, b"authorization") or b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.expected)


class BodyLimitMiddleware:
    """Reads the request body, up to ``limit`` bytes included (413 beyond it), then hands it on to the app;
    later reads (the app waiting for a disconnect) go to the connection."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = _header(scope, b"content-length")
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
        await send_json(send, 413, {"message": f"request body over the limit of {self.limit} bytes "
                                               f"(--max-body-bytes)"})
