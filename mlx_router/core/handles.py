"""The thread boundary between the event loop and an engine thread.

A `RequestHandle` is the async side of one generation: events arrive from the engine thread, `cancel()` is read by
it. An engine hands over each step's events for every request through one `Outbox`, in one thread-safe call.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator

from .types import Done, Event, Failed, GenerationRequest, TextDelta


class RequestHandle:
    """The async side of one generation. Events arrive from the engine thread; `cancel()` is read by it."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self._loop = loop
        self._pending: deque[Event] = deque()
        self._waiter: asyncio.Future[None] | None = None  # set while `next_event` waits for the engine
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Ask the engine to drop this request at its next step."""
        self._cancelled.set()

    def push(self, event: Event) -> None:
        """Deliver one event from another thread (the engine batches a step's events through `Outbox` instead)."""
        self._loop.call_soon_threadsafe(self._receive, [event])

    def _receive(self, events: list[Event]) -> None:
        self._pending.extend(events)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next_event(self) -> Event:
        # A bare future rather than an asyncio.Event: this runs once per streamed token of every request.
        while not self._pending:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._pending.popleft()

    def take_text(self, limit: int) -> list[TextDelta]:
        """Text deltas already queued, without waiting: lets a slow client catch up in fewer chunks."""
        out: list[TextDelta] = []
        while len(out) < limit and self._pending and isinstance(self._pending[0], TextDelta):
            out.append(self._pending.popleft())  # type: ignore[arg-type]
        return out

    async def events(self) -> AsyncIterator[Event]:
        """Every event up to and including the final Done or Failed."""
        while True:
            event = await self.next_event()
            yield event
            if isinstance(event, Done | Failed):
                return


class Outbox:
    """Hands events to the event loop: each engine step's events at once, in one thread-safe call per step at
    most (each costs a syscall and a GIL hand-over). While the loop has not yet taken the last step's events,
    later steps' events join them instead of scheduling another call."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._step: list[tuple[RequestHandle, list[Event]]] = []
        self._ready: deque[list[tuple[RequestHandle, list[Event]]]] = deque()  # shared with the loop
        self._scheduled = False

    def add(self, handle: RequestHandle, events: list[Event]) -> None:
        self._step.append((handle, events))

    def flush(self) -> None:  # the engine thread, at the end of each step
        if not self._step:
            return
        self._ready.append(self._step)
        self._step = []
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        # Reset before taking, so a step added from here on schedules its own call (flag and deque ops are
        # atomic under the GIL).
        self._scheduled = False
        while self._ready:
            for handle, events in self._ready.popleft():
                handle._receive(events)
