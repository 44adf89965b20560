"""One shape for every error the server answers: ``{"message": ...}`` JSON, whatever raised it.

Validation errors also carry pydantic's ``detail``. Bodies are written with ASCII escapes, so text that
is not valid Unicode (a lone surrogate sent as ``\\ud800``) can be echoed without failing the answer.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class HTTPError(Exception):
    """An error answered as ``status`` with ``{"message": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII characters escaped: any Python str (lone surrogates included) encodes."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":"), default=str).encode("ascii")


def message_response(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> AsciiJSONResponse:
    return AsciiJSONResponse({"message": message, **extra}, status_code=status, headers=headers)


def validation_message(errors: list[dict[str, Any]]) -> tuple[int, str]:
    """(status, one readable line naming each field) for a body pydantic could not parse or validate:
    400 for a body that is not JSON."""
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "invalid JSON body"
    if any(isinstance(e.get("input"), bytes) for e in errors):  # a body sent as another content type
        return 400, "the body must be a JSON object, sent with Content-Type: application/json"
    parts = []
    for e in errors:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return 422, "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, error: HTTPError) -> AsciiJSONResponse:
        return message_response(error.status, error.message, error.headers)

    @app.exception_handler(StarletteHTTPException)  # 404, 405, and FastAPI's own 400 for an unreadable body
    async def _starlette(request: Request, error: StarletteHTTPException) -> AsciiJSONResponse:
        if error.status_code == 404:
            message = f"no route {request.url.path}: see /docs for the routes"
        elif error.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(error.detail)
        return message_response(error.status_code, message, dict(error.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> AsciiJSONResponse:
        status, message = validation_message(list(error.errors()))
        return message_response(status, message, detail=json.loads(json.dumps(error.errors(), default=str)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> AsciiJSONResponse:
        logger.exception("request failed")
        return message_response(500, f"internal error: {type(error).__name__}: {error}")
