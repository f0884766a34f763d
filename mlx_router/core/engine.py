"""ModelEngine: one thread per resident model, the only code that calls MLX for it.

The thread loads the model, owns the tokenizer, mlx-lm's `BatchGenerator` (continuous batching) and the prefix
KV cache, and talks to the event loop only through an inbox queue and one event queue per request.
"""

from __future__ import annotations

import asyncio
import gc
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from loguru import logger

from ..config.discovery import ModelSpec
from .constrained import ConstraintCompiler
from .decode import RequestDecoder
from .errors import ContextTooLong, GenerationFailed, GenerationTimeout, ModelLoadFailed, Overloaded, RouterError
from .parsing import StreamParser
from .prompts import PromptBuilder
from .types import Done, Event, Failed, GenerationRequest, Started, TextDelta


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """Per-engine limits, resolved from settings by the manager."""

    max_batch_size: int = 32
    max_queued: int = 64
    timeout: float = 300.0
    warmup_tokens: int = 0
    prefix_cache_bytes: int = 1 << 30
    prefill_step_size: int = 512


class RequestHandle:
    """The async side of one generation. Events arrive from the engine thread; `cancel()` is read by it."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self._loop = loop
        self._pending: deque[Event] = deque()
        self._wakeup = asyncio.Event()
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Ask the engine to drop this request at its next step."""
        self._cancelled.set()

    def push(self, event: Event) -> None:
        """Called on the engine thread only."""
        self._loop.call_soon_threadsafe(self._append, event)

    def _append(self, event: Event) -> None:
        self._pending.append(event)
        self._wakeup.set()

    async def next_event(self) -> Event:
        while not self._pending:
            self._wakeup.clear()
            await self._wakeup.wait()
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


_STOP = object()


@dataclass(slots=True)
class _Active:
    handle: RequestHandle
    decoder: RequestDecoder
    deadline: float


class ModelEngine:
    """Owns one loaded model. Lifecycle: `await start()` (loads), `submit()` many times, `await stop()`."""

    def __init__(self, spec: ModelSpec, options: EngineOptions, prompts: PromptBuilder | None = None) -> None:
        self.spec = spec
        self.options = options
        self._prompts = prompts or PromptBuilder()
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._in_flight = 0
        self.family: str | None = self._prompts.family
        self.peak_batch_size = 0
        self.prefix_cache_bytes = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def start(self) -> None:
        """Start the engine thread and wait until it has loaded the model; raises ModelLoadFailed."""
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(loop, ready), name=f"engine:{self.spec.id}", daemon=True
        )
        self._thread.start()
        await ready

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request; raises Overloaded when this model's queue is full."""
        with self._lock:
            if self._in_flight >= self.options.max_batch_size + self.options.max_queued:
                raise Overloaded(f"model '{self.spec.id}' has too many queued requests; retry shortly", retry_after=1)
            self._in_flight += 1
        handle = RequestHandle(request, asyncio.get_running_loop())
        self._inbox.put(handle)
        return handle

    async def stop(self) -> None:
        """Finish the thread and free the model. The manager calls this only when no request holds the model."""
        if self._thread is None:
            return
        self._inbox.put(_STOP)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    # ---- everything below runs on the engine thread ----

    def _run(self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future[None]) -> None:
        started = time.perf_counter()
        try:
            from mlx_lm import load

            model, tokenizer = load(str(self.spec.path))[:2]
        except Exception as exc:  # any loader failure is reported, never raised into the thread's void
            logger.error("loading {} failed: {}", self.spec.id, exc)
            _resolve(loop, ready, ModelLoadFailed(f"model '{self.spec.id}' could not be loaded: {exc}"))
            return
        try:
            self._serve(model, tokenizer, loop, ready, started)
        finally:
            del model, tokenizer
            gc.collect()
            _clear_mlx_cache()

    def _serve(
        self, model: Any, tokenizer: Any, loop: asyncio.AbstractEventLoop, ready: asyncio.Future[None], t0: float
    ) -> None:
        from mlx_lm.generate import BatchGenerator
        from mlx_lm.models.cache import LRUPromptCache

        self._prompts = self._prompts.resolve_family(self.spec.config, tokenizer)
        self.family = self._prompts.family
        self._constraints = ConstraintCompiler(tokenizer)
        gen = self._make_batch_generator(BatchGenerator, model, tokenizer)
        self._warm_up(gen)
        logger.info("loaded {} in {:.2f}s", self.spec.id, time.perf_counter() - t0)
        _resolve(loop, ready, None)
        cache = LRUPromptCache(max_size=256, max_bytes=max(self.options.prefix_cache_bytes, 0))
        active: dict[int, _Active] = {}
        while True:
            for item in self._take_inbox(block=not active):
                if item is _STOP:
                    for a in active.values():
                        a.handle.push(Failed(GenerationFailed("the model was unloaded")))
                    return
                self._admit(item, gen, cache, tokenizer, active)
            self._reap(gen, active)
            if not active:
                continue
            try:
                _, responses = gen.next()
            except Exception as exc:  # a failed step must not take the other models or the server down
                logger.exception("generation step failed on {}", self.spec.id)
                for uid in list(active):
                    self._finish(uid, active, Failed(GenerationFailed(f"generation failed: {exc}")))
                gen = self._make_batch_generator(BatchGenerator, model, tokenizer)
                continue
            self.peak_batch_size = max(self.peak_batch_size, len(responses))
            for r in responses:
                self._deliver(r, gen, cache, active)
            self.prefix_cache_bytes = cache.nbytes

    def _make_batch_generator(self, cls: Any, model: Any, tokenizer: Any) -> Any:
        return cls(
            model,
            stop_tokens=[[t] for t in tokenizer.eos_token_ids],
            completion_batch_size=self.options.max_batch_size,
            prefill_batch_size=min(8, self.options.max_batch_size),
            prefill_step_size=self.options.prefill_step_size,
        )

    def _warm_up(self, gen: Any) -> None:
        if self.options.warmup_tokens <= 0:
            return
        gen.insert([[0, 1]], max_tokens=[self.options.warmup_tokens])
        while gen.next_generated():
            pass

    def _take_inbox(self, block: bool) -> list[Any]:
        items: list[Any] = []
        try:
            items.append(self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait())
            while True:
                items.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        return items

    def _admit(self, handle: RequestHandle, gen: Any, cache: Any, tokenizer: Any, active: dict[int, _Active]) -> None:
        if handle.cancelled:
            self._release()
            return
        request = handle.request
        try:
            prompt, in_reasoning = self._prompts.encode(tokenizer, request)
            max_tokens = self._check_context(len(prompt), request)
            kv, rest = _nearest_cache(cache, self.spec.id, prompt)
            parser = StreamParser(
                self._prompts.family or "generic",
                tools=request.tools,
                reasoning=self._prompts.reasoning,  # type: ignore[arg-type]
                tool_choice=request.tool_choice,
                start_in_reasoning=in_reasoning,
            )
            constraint = self._constraints.processor(request, self.family or "generic", in_reasoning=in_reasoning)
            decoder = RequestDecoder(
                tokenizer, request.sampling, parser, prompt_tokens=len(prompt), constraint=constraint
            )
            (uid,) = gen.insert(
                [rest],
                max_tokens=[max_tokens],
                caches=[kv] if kv is not None else None,
                all_tokens=[prompt[: len(prompt) - len(rest)]],
                samplers=[decoder.sampler],
                logits_processors=[decoder.logits_processors],
            )
        except RouterError as exc:
            handle.push(Failed(exc))
            self._release()
            return
        except Exception as exc:  # e.g. a tokenizer template failure: the request fails, the engine lives on
            logger.exception("could not start request {}", request.request_id)
            handle.push(Failed(GenerationFailed(f"could not process the prompt: {exc}")))
            self._release()
            return
        decoder.cached_tokens = len(prompt) - len(rest)
        active[uid] = _Active(handle, decoder, time.monotonic() + self.options.timeout)
        handle.push(Started(prompt_tokens=len(prompt), cached_tokens=decoder.cached_tokens))

    def _check_context(self, prompt_len: int, request: GenerationRequest) -> int:
        window = self.spec.context_window
        max_tokens = request.sampling.max_tokens
        if window is None:
            return max_tokens
        if prompt_len >= window:
            raise ContextTooLong(
                f"this model's maximum context length is {window} tokens, but the prompt has {prompt_len} tokens",
                param="messages",
            )
        room = window - prompt_len
        if request.max_tokens_requested is not None and prompt_len + request.max_tokens_requested > window:
            raise ContextTooLong(
                f"this model's maximum context length is {window} tokens; the prompt has {prompt_len} tokens and "
                f"max_tokens asks for {request.max_tokens_requested} more (at most {room} fit)",
                param="max_tokens",
            )
        return min(max_tokens, room)

    def _reap(self, gen: Any, active: dict[int, _Active]) -> None:
        now = time.monotonic()
        for uid, a in list(active.items()):
            if a.handle.cancelled:
                gen.remove([uid])
                self._finish(uid, active, None)
            elif now > a.deadline:
                gen.remove([uid])
                error = GenerationTimeout(f"generation exceeded the {self.options.timeout:g}s timeout")
                self._finish(uid, active, Failed(error))

    def _deliver(self, r: Any, gen: Any, cache: Any, active: dict[int, _Active]) -> None:
        a = active.get(r.uid)
        if a is None:
            return
        events, finish = a.decoder.step(r.token, r.logprobs, r.finish_reason)
        for event in events:
            a.handle.push(event)
        if finish is None:
            return
        if r.finish_reason is None:  # a stop string ended it before the model did
            gen.remove([r.uid])
        elif r.prompt_cache is not None:
            cache.insert_cache(self.spec.id, list(r.all_tokens), r.prompt_cache)
        self._finish(r.uid, active, Done(finish, a.decoder.usage()))

    def _finish(self, uid: int, active: dict[int, _Active], event: Event | None) -> None:
        a = active.pop(uid)
        if event is not None:
            a.handle.push(event)
        self._release()

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1


def _nearest_cache(cache: Any, key: str, prompt: list[int]) -> tuple[Any, list[int]]:
    """The longest cached prefix of `prompt` and the tokens still to prefill (never none: one must be fed)."""
    from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

    kv, rest = cache.fetch_nearest_cache(key, prompt)
    if kv is not None and not rest:
        if not can_trim_prompt_cache(kv):
            return None, prompt
        trim_prompt_cache(kv, 1)
        rest = prompt[-1:]
    return kv, list(rest)


def _resolve(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[None], error: Exception | None) -> None:
    def settle() -> None:
        if fut.done():
            return
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)

    loop.call_soon_threadsafe(settle)


def _clear_mlx_cache() -> None:
    import mlx.core as mx

    mx.clear_cache()
