"""Serving logic for chat completions: drive a started Generation and translate its events."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from ...core.errors import RouterError
from ...core.manager import Generation
from ...core.types import Done, Failed, ReasoningDelta, TextDelta, ToolCallDelta
from ..errors import error_body
from ..sse import StreamError
from .convert import ChunkWriter, CompletionBuilder


@dataclass(slots=True)
class RequestTimer:
    """Timing for the one log line each request gets, from the handler's start: its TTFT counts resolving, queueing
    and the prompt's prefill, as a client sees them."""

    model: str
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None

    def token(self) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter()

    def log(self, done: Done) -> None:
        now = time.perf_counter()
        ttft = (self.first_token or now) - self.started
        decode = now - (self.first_token or now)
        speed = (done.usage.completion_tokens - 1) / decode if decode > 0 else 0.0
        logger.info(
            "chat model={} prompt={} cached={} completion={} finish={} ttft={:.3f}s decode={:.1f} tok/s total={:.2f}s",
            self.model,
            done.usage.prompt_tokens,
            done.usage.cached_tokens,
            done.usage.completion_tokens,
            done.finish_reason,
            ttft,
            speed,
            now - self.started,
        )


async def complete(
    generation: Generation, completion_id: str, model: str, logprobs: bool, timer: RequestTimer
) -> dict[str, Any]:
    """Collect a whole non-streamed completion; raises the generation's error if it fails."""
    builder = CompletionBuilder(completion_id, model, logprobs)
    async for event in generation.events():
        if isinstance(event, TextDelta | ReasoningDelta | ToolCallDelta):
            timer.token()
            builder.add(event)
        elif isinstance(event, Failed):
            raise event.error
        elif isinstance(event, Done):
            timer.log(event)
            return builder.build(event.finish_reason, event.usage)
    raise RuntimeError("generation ended without a final event")


async def stream_chunks(
    generation: Generation,
    writer: ChunkWriter,
    timer: RequestTimer,
    *,
    include_usage: bool,
    chunk_size: int,
) -> AsyncIterator[str | StreamError]:
    """OpenAI chunks (JSON text) for a started generation: role first, then deltas, finish, optional usage."""
    yield writer.role()
    try:
        async for event in generation.events():
            if isinstance(event, TextDelta):
                timer.token()
                yield writer.text(_merge(event, generation.take_text(chunk_size - 1)))
            elif isinstance(event, ReasoningDelta):
                timer.token()
                yield writer.reasoning(event)
            elif isinstance(event, ToolCallDelta):
                timer.token()
                yield writer.tool_call(event)
            elif isinstance(event, Failed):
                error = event.error
                yield StreamError(error_body(error if isinstance(error, RouterError) else RouterError(str(error))))
                return
            elif isinstance(event, Done):
                timer.log(event)
                yield writer.finish(event.finish_reason)
                if include_usage:
                    yield writer.usage(event.usage)
                return
    finally:
        generation.close()


def _merge(first: TextDelta, queued: list[TextDelta]) -> TextDelta:
    """Fold deltas that queued up while the client was slow into one chunk (at most `stream_chunk_size`)."""
    if not queued:
        return first
    deltas = [first, *queued]
    return TextDelta("".join(d.text for d in deltas), tuple(lp for d in deltas for lp in d.logprobs))
