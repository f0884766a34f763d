"""Request ids and counters, as plain ASGI middleware (BaseHTTPMiddleware would buffer streams)."""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from loguru import logger
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


@dataclass(slots=True)
class RequestStats:
    started_at: float = field(default_factory=time.time)
    total: int = 0
    active: int = 0
    failed: int = 0


class RequestIdMiddleware:
    """Tags every log line of a request with its id, returns it as X-Request-ID, and counts requests."""

    def __init__(self, app: ASGIApp, stats: RequestStats) -> None:
        self.app = app
        self.stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _client_request_id(scope) or f"req-{secrets.token_hex(6)}"
        scope.setdefault("state", {})["request_id"] = rid
        self.stats.total += 1
        self.stats.active += 1
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        try:
            with logger.contextualize(request_id=rid):
                await self.app(scope, receive, send_with_id)
        finally:
            self.stats.active -= 1
            if status >= 400:
                self.stats.failed += 1


def _client_request_id(scope: Scope) -> str | None:
    headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
    for name, value in headers:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if _CLIENT_ID.match(text) else None
    return None


def snapshot(stats: RequestStats) -> dict[str, Any]:
    return {
        "uptime_s": round(time.time() - stats.started_at, 1),
        "requests": {"total": stats.total, "active": stats.active, "failed": stats.failed},
    }
