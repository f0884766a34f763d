"""ModelEngine: one thread per resident model, the only code that calls MLX for it.

The thread loads the model, owns the tokenizer, mlx-lm's `BatchGenerator` (continuous batching) and the prefix
KV cache, and talks to the event loop only through an inbox queue and one `RequestHandle` per request
(`handles.py`). A request that runs alone is decoded on a faster single-stream path (`single_stream.py`) and moves
into the batch when another arrives, and back out when it is alone again.
"""

from __future__ import annotations

import asyncio
import gc
import queue
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from ..config.discovery import ModelSpec
from .constrained import ConstraintCompiler
from .decode import RequestDecoder
from .decode_attention import install as route_attention
from .errors import ContextTooLong, GenerationFailed, GenerationTimeout, ModelLoadFailed, Overloaded, RouterError
from .fused_projections import fuse_projections
from .handles import Outbox, RequestHandle
from .parsing import StreamParser
from .prefill import prefill_in_progress, prefill_step_for, size_prompt_batch
from .prefix_cache import PrefixCache
from .prompts import PromptBuilder
from .sampling import SamplerPool
from .single_stream import SoloStream
from .types import Done, Event, Failed, GenerationRequest, SamplingParams, Started


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """Per-engine limits, resolved from settings by the manager."""

    max_batch_size: int = 32
    max_queued: int = 64
    timeout: float = 300.0
    warmup_tokens: int = 0
    prefix_cache_bytes: int = 1 << 30
    prefill_step_size: int | None = None  # prompt tokens per prefill chunk; None: by backend (prefill.py)
    max_prefill_hold: int = 8  # steps new requests may wait for the prompt batch under way to move on to decoding
    idle_release_s: float | None = 2.0  # quiet seconds before MLX's cached buffers go back to the system; None: never


_STOP = object()


@dataclass(slots=True)
class _Active:
    handle: RequestHandle
    decoder: RequestDecoder
    deadline: float
    max_tokens: int
    uid: int | None = None  # BatchGenerator's id while batched
    solo: SoloStream | None = None  # set while decoded alone


@dataclass(slots=True)
class _Worker:
    """The engine thread's state: model, generators, prefix cache, the requests it decodes and their events."""

    model: Any
    tokenizer: Any
    gen: Any
    cache: PrefixCache
    outbox: Outbox
    constraints: ConstraintCompiler
    samplers: SamplerPool = field(default_factory=SamplerPool)
    batch: dict[int, _Active] = field(default_factory=dict)  # by BatchGenerator uid
    solo: _Active | None = None  # the request decoded alone, if any
    waiting: deque[RequestHandle] = field(default_factory=deque)  # arrived, held until a prompt batch can start
    held_steps: int = 0  # steps the waiting requests have been held so far
    can_leave_batch: bool = True

    @property
    def busy(self) -> bool:
        return bool(self.batch) or self.solo is not None

    def running(self) -> list[_Active]:
        return [*self.batch.values(), *([self.solo] if self.solo else [])]


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
        # How often a request moved between decoding alone and the batch (diagnostics and tests).
        self.moves_to_batch = 0
        self.moves_to_solo = 0
        self._attention_routed = False  # set on the engine thread when the model loads

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

            self._attention_routed = route_attention()
            model, tokenizer = load(str(self.spec.path))[:2]
        except Exception as exc:  # any loader failure is reported, never raised into the thread's void
            self._load_failed(loop, ready, exc)
            return
        try:
            fuse_projections(model)
        except Exception:  # the groups fused so far are complete: the model computes the same, a little slower
            logger.exception("fusing the projections of {} failed; it is served as loaded", self.spec.id)
        try:
            self._serve(model, tokenizer, loop, ready, started)
        finally:
            unloaded = weakref.ref(model)  # an mlx `nn.Module`: a dict subclass, which takes weak references
            del model, tokenizer
            _free_unloaded(unloaded)
            _clear_mlx_cache()

    def _load_failed(self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future[None], exc: Exception) -> None:
        logger.error("loading {} failed: {}", self.spec.id, exc)
        _resolve(loop, ready, ModelLoadFailed(f"model '{self.spec.id}' could not be loaded: {exc}"))

    def _serve(
        self, model: Any, tokenizer: Any, loop: asyncio.AbstractEventLoop, ready: asyncio.Future[None], t0: float
    ) -> None:
        try:
            w = self._new_worker(model, tokenizer, loop)
            warm_from = time.perf_counter()
            self._warm_up(w)
            warm_up_s = time.perf_counter() - warm_from
        except Exception as exc:  # out of memory in the warm-up, say: the load fails rather than hangs
            self._load_failed(loop, ready, exc)
            return
        _freeze_heap()
        logger.info("loaded {} in {:.2f}s (warm-up {:.2f}s)", self.spec.id, time.perf_counter() - t0, warm_up_s)
        _resolve(loop, ready, None)
        quiet_since: float | None = time.monotonic()  # since when nothing ran; None once the cache was given back
        while True:
            idle = not w.busy and not w.waiting
            items = self._take_inbox(block=idle)
            if idle and not items:
                quiet_since = self._release_cache_when_quiet(quiet_since)
                continue
            quiet_since = time.monotonic()
            if _STOP in items:
                unloaded: list[Event] = [Failed(GenerationFailed("the model was unloaded"))]
                for h in [*(a.handle for a in w.running()), *w.waiting, *(i for i in items if i is not _STOP)]:
                    w.outbox.add(h, unloaded)
                w.outbox.flush()
                return
            try:
                self._tick(w, items)
            except Exception as exc:  # a failed step (out of memory, a bug) must not take the server down
                self._fail_running(w, exc)
            w.outbox.flush()
            self.prefix_cache_bytes = w.cache.nbytes

    def _release_cache_when_quiet(self, quiet_since: float | None) -> float | None:
        """Give MLX's cached buffers back once the engine has been idle for `idle_release_s`.

        MLX keeps the buffers of finished work for reuse, up to gigabytes after a burst of long prompts: memory that
        other applications (unified memory on a Mac) cannot use while this model sits idle. Back-to-back requests
        keep their cache; the first steps after a quiet spell allocate again. (On CUDA, MLX frees into a
        stream-ordered pool, which did not always hand the memory back to the device for other processes.)
        """
        after = self.options.idle_release_s
        if quiet_since is not None and after is not None and time.monotonic() - quiet_since >= after:
            _clear_mlx_cache()
            return None
        return quiet_since

    def _new_worker(self, model: Any, tokenizer: Any, loop: asyncio.AbstractEventLoop) -> _Worker:
        self._prompts = self._prompts.resolve_family(self.spec.config, tokenizer)
        self.family = self._prompts.family
        cache = PrefixCache(max_size=256, max_bytes=max(self.options.prefix_cache_bytes, 0))
        gen = self._make_batch_generator(model, tokenizer)
        return _Worker(model, tokenizer, gen, cache, Outbox(loop), ConstraintCompiler(tokenizer))

    def _tick(self, w: _Worker, items: list[Any]) -> None:
        """One turn of the engine loop: admit new requests, drop cancelled ones, decode one token for the rest."""
        w.waiting.extend(items)
        if w.waiting and w.solo is not None:
            self._solo_to_batch(w)
        elif not w.waiting and w.solo is None and len(w.batch) == 1 and w.can_leave_batch:
            self._batch_to_solo(w)
        if w.waiting:
            self._admit_waiting(w)
        self._reap(w)
        if w.solo is not None:
            self._step_solo(w, w.solo)
        elif w.batch:
            self._step_batch(w)

    def _fail_running(self, w: _Worker, exc: Exception) -> None:
        """End every running request with the error and start from an empty batch; the model stays loaded."""
        logger.opt(exception=exc).error("generation step failed on {}", self.spec.id)
        for a in w.running():
            self._end(w, a, Failed(GenerationFailed(f"generation failed: {exc}")), in_generator=False)
        w.gen = self._make_batch_generator(w.model, w.tokenizer)
        # Out of memory is the likely cause: give back the failed batch's buffers before the next request.
        gc.collect()
        _clear_mlx_cache()

    def _make_batch_generator(self, model: Any, tokenizer: Any) -> Any:
        from mlx_lm.generate import BatchGenerator

        return BatchGenerator(
            model,
            stop_tokens=[[t] for t in tokenizer.eos_token_ids],
            completion_batch_size=self.options.max_batch_size,
            prefill_batch_size=min(8, self.options.max_batch_size),
            prefill_step_size=self.options.prefill_step_size or prefill_step_for(),
        )

    def _warm_up(self, w: _Worker) -> None:
        """Compile the kernels of both decode paths before the first request (`warmup_tokens`).

        On CUDA the batch's warm-up runs regardless, since MLX compiles kernels on first use (NVRTC, some seconds
        each on a machine whose PTX cache is empty): the decode-attention kernel (the first overlapping requests
        waited 5.4 s for it in a bench run on the H200), the prefill ops of left-padded rows, and a temperature
        sampler's kernels, which differ for one row and several (the first request at temperature 1 waited 12-14 s on
        a fresh H200). So a lone stream runs, then a batch of two prompts of different lengths, which pads one and
        passes a mask as any batch does.
        """
        n = self.options.warmup_tokens
        if n == 0 and not self._attention_routed:
            return
        steps = max(n, 2)
        sampler = w.samplers.get(SamplingParams(max_tokens=steps, temperature=1.0))
        solo = SoloStream(
            w.gen, cache=None, tokens=[], rest=[0, 1, 2], max_tokens=steps, sampler=sampler, logits_processors=[],
            stop_tokens=(),
        )  # fmt: skip
        while (step := solo.advance()) is None or step[2] is None:
            pass
        w.gen.insert([[0, 1, 2, 3], [0, 1, 2]], max_tokens=[steps] * 2, samplers=[sampler] * 2)
        while w.gen.next_generated():
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

    def _admit_waiting(self, w: _Worker) -> None:
        """Start the waiting requests, unless the generator still holds prompts that are not yet decoding.

        mlx-lm adds new prompts to a prompt batch that is already under way: their chunks no longer line up, so
        every chunk is left-padded and the finished batch's KV caches are rolled into place. On the H100, 8
        prompts of 2,048 tokens arriving a few at a time waited 8.7 s for their first token, against 2.4 s with
        the hold, and short prompts prefilled in misaligned batches of 2 and 6 took 130-200 ms a step instead of
        40-90 ms in batches of 8. Holding them until the prompt batch is empty lets each one start together and
        full; the hold is bounded, so a very long prompt cannot starve the ones behind it.
        """
        if w.batch and w.held_steps < self.options.max_prefill_hold and prefill_in_progress(w.gen):
            w.held_steps += 1
            return
        w.held_steps = 0
        alone = len(w.waiting) == 1 and not w.busy
        while w.waiting:
            self._admit(w, w.waiting.popleft(), alone=alone)

    def _admit(self, w: _Worker, handle: RequestHandle, *, alone: bool) -> None:
        """Start a request: alone on the fast path when nothing else runs, else in the batch."""
        if handle.cancelled:
            self._release()
            return
        request = handle.request
        family = self.family or "generic"
        try:
            prompt, in_reasoning = self._prompts.encode(w.tokenizer, request)
            max_tokens = self._check_context(len(prompt), request)
            kv, rest = w.cache.nearest(self.spec.id, prompt)
            parser = StreamParser(
                family,
                tools=request.tools,
                reasoning=self._prompts.reasoning,  # type: ignore[arg-type]
                tool_choice=request.tool_choice,
                start_in_reasoning=in_reasoning,
            )
            constraint = w.constraints.processor(request, family, in_reasoning=in_reasoning)
            decoder = RequestDecoder(
                w.tokenizer,
                request.sampling,
                parser,
                sampler=w.samplers.get(request.sampling),
                prompt_tokens=len(prompt),
                constraint=constraint,
            )
            a = _Active(handle, decoder, time.monotonic() + self.options.timeout, max_tokens)
            prefix = prompt[: len(prompt) - len(rest)]
            if alone:
                a.solo = SoloStream(
                    w.gen, cache=kv, tokens=prefix, rest=rest, max_tokens=max_tokens, sampler=decoder.sampler,
                    logits_processors=decoder.logits_processors, stop_tokens=w.tokenizer.eos_token_ids,
                )  # fmt: skip
            else:
                (a.uid,) = w.gen.insert(
                    [rest],
                    max_tokens=[max_tokens],
                    caches=[kv] if kv is not None else None,
                    all_tokens=[prefix],
                    samplers=[decoder.sampler],
                    logits_processors=[decoder.logits_processors],
                )
        except RouterError as exc:
            w.outbox.add(handle, [Failed(exc)])
            self._release()
            return
        except Exception as exc:  # e.g. a tokenizer template failure: the request fails, the engine lives on
            logger.exception("could not start request {}", request.request_id)
            w.outbox.add(handle, [Failed(GenerationFailed(f"could not process the prompt: {exc}"))])
            self._release()
            return
        if a.uid is not None:
            w.batch[a.uid] = a
        else:
            w.solo = a
        decoder.cached_tokens = len(prefix)
        w.outbox.add(handle, [Started(prompt_tokens=len(prompt), cached_tokens=decoder.cached_tokens)])

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

    def _solo_to_batch(self, w: _Worker) -> None:
        """A second request arrived: move the lone one into the batch, with its KV cache and position."""
        a = w.solo
        assert a is not None and a.solo is not None
        try:
            last = None
            if a.solo.decoding:  # report the token already sampled; the batch starts from it as its prompt
                step = a.solo.take_pending()
                if self._deliver(w, a, *step):
                    return
                last = step[0]
            a.uid = a.solo.to_batch(w.gen, last)
        except Exception as exc:  # a failed move ends this request only
            logger.exception("moving a request into the batch failed on {}", self.spec.id)
            self._end(w, a, Failed(GenerationFailed(f"generation failed: {exc}")))
            # The generator may hold the half-moved sequence; nothing else was in it, so a fresh one loses nothing.
            w.gen = self._make_batch_generator(w.model, w.tokenizer)
            return
        w.solo, a.solo = None, None
        w.batch[a.uid] = a
        self.moves_to_batch += 1

    def _batch_to_solo(self, w: _Worker) -> None:
        """The batch is down to one request and nothing waits: decode it on the fast path from here on."""
        ((uid, a),) = w.batch.items()
        try:
            solo = SoloStream.from_batch(
                w.gen, uid, max_tokens=a.max_tokens, generated=a.decoder.completion_tokens,
                sampler=a.decoder.sampler, logits_processors=a.decoder.logits_processors,
                stop_tokens=w.tokenizer.eos_token_ids,
            )  # fmt: skip
        except Exception:  # it reads BatchGenerator internals: if they changed, stay batched from now on
            logger.exception("cannot move a request out of the batch on {}; batching it instead", self.spec.id)
            w.can_leave_batch = False
            return
        if solo is not None:
            del w.batch[uid]
            a.uid, a.solo, w.solo = None, solo, a
            self.moves_to_solo += 1

    def _reap(self, w: _Worker) -> None:
        now = time.monotonic()
        for a in w.running():
            if a.handle.cancelled:
                self._end(w, a, None)
            elif now > a.deadline:
                self._end(w, a, Failed(GenerationTimeout(f"generation exceeded the {self.options.timeout:g}s timeout")))

    def _step_solo(self, w: _Worker, a: _Active) -> None:
        assert a.solo is not None
        step = a.solo.advance()
        self.peak_batch_size = max(self.peak_batch_size, 1)
        if step is not None:
            self._deliver(w, a, *step)

    def _step_batch(self, w: _Worker) -> None:
        size_prompt_batch(w.gen)
        _, responses = w.gen.next()
        self.peak_batch_size = max(self.peak_batch_size, len(responses))
        for r in responses:
            if (b := w.batch.get(r.uid)) is not None:
                kv = (r.all_tokens, r.prompt_cache) if r.prompt_cache is not None else None
                self._deliver(w, b, r.token, r.logprobs, r.finish_reason, kv)

    def _deliver(
        self, w: _Worker, a: _Active, token: int, logprobs: Any, model_finish: str | None, kv: Any = None
    ) -> bool:
        """Turn one token into events; True when the request ended. `kv`: a finished batch row's (tokens, cache)."""
        events, finish = a.decoder.step(token, logprobs, model_finish)
        if events:
            w.outbox.add(a.handle, events)
        if finish is None:
            return False
        if model_finish is not None:  # the model ended it (not a stop string): keep its KV for later prompts
            if a.solo is not None:
                kv = a.solo.saved()
            if kv is not None:
                try:
                    w.cache.keep(self.spec.id, list(kv[0]), kv[1])
                except Exception:  # e.g. out of memory for the copy: the answer is complete, only the reuse is lost
                    logger.exception("could not keep a finished prompt's KV cache on {}", self.spec.id)
        # A stop string ends the request before the model does, so BatchGenerator still holds it.
        self._end(w, a, Done(finish, a.decoder.usage()), in_generator=model_finish is None)
        return True

    def _end(self, w: _Worker, a: _Active, event: Event | None, *, in_generator: bool = True) -> None:
        if a.uid is not None:
            if in_generator:
                w.gen.remove([a.uid])
            del w.batch[a.uid]
        elif w.solo is a:
            w.solo = None
        if event is not None:
            w.outbox.add(a.handle, [event])
        self._release()

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1


def _resolve(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[None], error: Exception | None) -> None:
    def settle() -> None:
        if fut.done():
            return
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)

    loop.call_soon_threadsafe(settle)


def _freeze_heap() -> None:
    """Collect, then keep every object alive now out of later collections' walks.

    A full collection walks every tracked object. On the H100 host (where transformers imports torch) one took
    308 ms in the middle of a c=32 level, stalling every stream. The model's module tree, the tokenizer and the
    server's own modules live as long as the model at least, so they need not be walked again.
    """
    gc.collect()
    gc.freeze()


def _free_unloaded(model: weakref.ref[Any]) -> None:
    """Free an unloaded model, walking the frozen heap only when the model is left in a reference cycle.

    Reference counting frees a model that no cycle holds, with its arrays; a collection of the objects made since
    the load then costs milliseconds. Only if the model is still alive, in a cycle among the objects frozen after
    its load, does the whole heap come back for a full collection. That one took 0.25 s on an H100 host where
    transformers imports torch, holding the GIL: the event loop and the next model's load waited for it (a swap,
    BENCHMARKS.md session 12). Frozen garbage that holds no model (a few objects per unload) stays frozen. Nothing
    is frozen here otherwise: another model may be loading beside this teardown, and its garbage must stay
    collectable.
    """
    gc.collect()
    if model() is not None:
        gc.unfreeze()
        _freeze_heap()


def _clear_mlx_cache() -> None:
    import mlx.core as mx

    mx.clear_cache()
