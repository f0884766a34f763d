"""Stream framing (SSE and the legacy json_lines / json_array formats) and client-disconnect handling."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from fastapi import Request

T = TypeVar("T")
StreamingFormat = Literal["sse", "json_lines", "json_array"]

MEDIA_TYPES: dict[str, str] = {
    "sse": "text/event-stream",
    "json_lines": "application/x-ndjson",
    "json_array": "application/json",
}


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


@dataclass(frozen=True, slots=True)
class StreamError:
    """The last item of a stream that failed after it started: an error envelope, not a chunk."""

    body: dict[str, Any]


def _text(chunk: str | StreamError) -> str:
    return json.dumps(chunk.body, ensure_ascii=False) if isinstance(chunk, StreamError) else chunk


async def frame(chunks: AsyncIterator[str | StreamError], fmt: StreamingFormat) -> AsyncIterator[str]:
    """Frame JSON chunks (and a final StreamError) in the configured format."""
    if fmt == "json_array":
        yield "[" + ", ".join([_text(c) async for c in chunks]) + "]"
        return
    errored = False
    async for chunk in chunks:
        errored = isinstance(chunk, StreamError)
        data = _text(chunk)
        yield f"data: {data}\n\n" if fmt == "sse" else data + "\n"
    if fmt == "sse" and not errored:  # after an error event the stream just ends
        yield "data: [DONE]\n\n"


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (its `finally` blocks free the model)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientGone()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def _wait_for_disconnect(request: Request) -> None:
    # The body was read already, so the next ASGI message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
