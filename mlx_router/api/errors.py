"""The one table from domain errors to HTTP status and the OpenAI error envelope, for JSON and SSE alike."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from loguru import logger
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core import errors as e

# error class → (HTTP status, OpenAI error type)
_STATUS: dict[type[e.RouterError], tuple[int, str]] = {
    e.InvalidRequest: (400, "invalid_request_error"),
    e.UnsupportedParameter: (400, "invalid_request_error"),
    e.ContextTooLong: (400, "invalid_request_error"),
    e.ModelNotFound: (404, "invalid_request_error"),
    e.Overloaded: (429, "rate_limit_error"),
    e.NoCapacity: (503, "server_error"),
    e.ModelLoadFailed: (503, "server_error"),
    e.InsufficientMemory: (503, "server_error"),
    e.GenerationTimeout: (504, "server_error"),
    e.GenerationFailed: (500, "server_error"),
}


def status_of(error: e.RouterError) -> tuple[int, str]:
    for cls in type(error).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return 500, "server_error"


def envelope(message: str, type_: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_body(error: e.RouterError) -> dict[str, Any]:
    _, type_ = status_of(error)
    return envelope(error.message, type_, error.code, error.param)


def error_response(error: e.RouterError) -> JSONResponse:
    status, _ = status_of(error)
    headers = {"Retry-After": str(error.retry_after)} if isinstance(error, e.Overloaded | e.NoCapacity) else None
    return JSONResponse(error_body(error), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('msg', '')}", None
    return f"{param or 'body'}: {first.get('msg', 'invalid value')}", param


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves in the OpenAI envelope: no FastAPI 422, no HTML, no bare 500."""

    @app.exception_handler(e.RouterError)
    async def router_error(_: Request, exc: e.RouterError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(envelope(message, "invalid_request_error", "invalid_request", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else "http_error"
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(envelope(str(exc.detail), type_, code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error: {}", exc)
        return JSONResponse(envelope("internal server error", "server_error", "internal_error"), status_code=500)
