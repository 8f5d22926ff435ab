"""Every failure of the HTTP API answers with a JSON `Error` body.

`ApiError` is what handlers and option parsers raise to answer at once;
`EXCEPTION_HANDLERS` maps it, Starlette's `HTTPException` (unknown path,
wrong method) and the library's errors to their status codes; `JsonErrors`
is the outermost net for anything unexpected (500).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from csvimg._errors import CsvimgError, NotFoundError, StorageError
from csvimg.jobs import RequestStatus
from csvimg_server._bodies import Error

__all__ = ["EXCEPTION_HANDLERS", "ApiError", "JsonErrors", "error"]

log = logging.getLogger("csvimg.server")


def error(status_code: int, message: str, *, status: RequestStatus | None = None) -> JSONResponse:
    """An `Error` response; *status* is the request's, for a 409."""
    return Error(error=message, status=status).response(status_code)


class ApiError(Exception):
    """Raised by helpers to answer with a JSON error at once."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class JsonErrors:
    """Turns any unexpected exception into ``500 {"error": "internal error"}``.

    Starlette's own 500 handler re-raises after answering, so the server
    would log the traceback a second time; here it is logged once, on the
    ``csvimg.server`` logger, and never sent to the client.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app; answer 500 if it raises before a response started."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            if started:
                raise  # a body is half sent: let the server abort the connection
            await error(500, "internal error")(scope, receive, send)


def _allowed_methods(request: Request) -> set[str]:
    """Every method some route serves at this path (one path may have several routes)."""
    allowed: set[str] = set()
    for route in request.app.routes:
        if isinstance(route, Route) and route.methods:
            match, _ = route.matches({**request.scope, "method": "GET"})
            if match is not Match.NONE:
                allowed |= route.methods
    return allowed


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = {404: "not found", 405: "method not allowed"}.get(exc.status_code, exc.detail)
    headers = dict(exc.headers or {})
    if exc.status_code == 405 and (allowed := _allowed_methods(request)):
        # Starlette lists only the first route's methods.
        headers["Allow"] = ", ".join(sorted(allowed))
    return Error(error=message).response(exc.status_code, headers)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error(exc.status, exc.message)


async def _storage_error(request: Request, exc: Exception) -> Response:
    log.error("%s %s: storage failed: %s", request.method, request.url.path, exc)
    return error(500, f"database error: {exc}")


async def _not_found(request: Request, exc: Exception) -> Response:
    return error(404, str(exc))


async def _csvimg_error(request: Request, exc: Exception) -> Response:
    # Any other deliberate error of the library is still a server fault,
    # but one with a message worth showing.
    log.error("%s %s: %s", request.method, request.url.path, exc)
    return error(500, f"{type(exc).__name__}: {exc}")


EXCEPTION_HANDLERS: Final[
    Mapping[type[Exception], Callable[[Request, Exception], Awaitable[Response]]]
] = {
    HTTPException: _http_error,
    ApiError: _api_error,
    StorageError: _storage_error,
    NotFoundError: _not_found,
    CsvimgError: _csvimg_error,
}
"""Starlette's ``exception_handlers``: each error class and its JSON answer."""
