"""MLXModelManager: the sole owner of model residency.

It resolves ids, loads models once however many requests ask at the same time, keeps at most `cache_size` of
them resident within the memory budget, evicts the least recently used idle one to make room, and never unloads a
model while a lease holds it. Every change to the table of resident models happens under one asyncio lock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from loguru import logger

from ..config.discovery import ModelRegistry, ModelSpec, estimate_memory_bytes
from ..config.settings import Settings
from .engine import EngineOptions, ModelEngine
from .errors import InsufficientMemory, ModelLoadFailed, ModelNotFound, NoCapacity
from .handles import RequestHandle
from .memory import MemoryProbe, system_memory
from .prompts import PromptBuilder
from .types import Done, Event, Failed, GenerationRequest, ModelState, ModelStatus, Started, TextDelta

GiB = 1024**3


class Engine(Protocol):
    """What the manager needs from an engine; tests pass scripted fakes through `engine_factory`."""

    @property
    def in_flight(self) -> int: ...
    @property
    def prefix_cache_bytes(self) -> int: ...
    async def start(self) -> None: ...
    def submit(self, request: GenerationRequest) -> RequestHandle: ...
    async def stop(self) -> None: ...


EngineFactory = Callable[[ModelSpec, EngineOptions], Engine]


@dataclass(slots=True)
class _Resident:
    spec: ModelSpec
    engine: Engine
    need_bytes: int
    state: ModelState = ModelState.LOADING
    leases: int = 0
    pinned: bool = False
    loaded_at: float | None = None
    last_used: float = 0.0
    load_task: asyncio.Task[None] | None = None


class ModelLease:
    """A reference to a resident model; the model cannot be evicted until every lease is released."""

    def __init__(self, manager: MLXModelManager, resident: _Resident) -> None:
        self._manager = manager
        self._resident = resident
        self._released = False

    @property
    def engine(self) -> Engine:
        return self._resident.engine

    @property
    def spec(self) -> ModelSpec:
        return self._resident.spec

    def release(self) -> None:
        """Idempotent: called from `finally` blocks and disconnect handlers alike."""
        if not self._released:
            self._released = True
            self._manager._release(self._resident)


class Generation:
    """A started generation: holds its lease until the final event arrives or `close()` is called."""

    def __init__(self, lease: ModelLease, handle: RequestHandle, started: Started) -> None:
        self.lease = lease
        self.handle = handle
        self.started = started
        self._finished = False

    async def events(self) -> AsyncIterator[Event]:
        """Events after `Started`, up to and including Done or Failed."""
        try:
            while True:  # not `handle.events()`: one generator layer fewer on every streamed token
                event = await self.handle.next_event()
                if isinstance(event, Done | Failed):
                    self._finished = True
                    yield event
                    return
                yield event
        finally:
            self.close()

    def take_text(self, limit: int) -> list[TextDelta]:
        """Text already generated and waiting, up to `limit` deltas."""
        return self.handle.take_text(limit)

    def close(self) -> None:
        """Stop the generation (if still running) and release the model."""
        if not self._finished:
            self.handle.cancel()
        self.lease.release()


class _Notifier:
    """Wakes every waiter when a lease is released or a model leaves, so they re-check for room."""

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    async def wait(self, timeout: float) -> bool:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)

    def notify_all(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)


class MLXModelManager:
    """Loads, evicts, pins and leases models. Handlers only call `resolve`, `start_generation` and `snapshot`."""

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry | None = None,
        *,
        engine_factory: EngineFactory | None = None,
        memory_probe: MemoryProbe = system_memory,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.registry = registry or ModelRegistry(settings)
        self._engine_factory = engine_factory or _default_engine_factory(self.registry)
        self._memory_probe = memory_probe
        self._clock = clock
        self._lock = asyncio.Lock()
        self._room = _Notifier()
        self._resident: dict[str, _Resident] = {}
        self._draining: dict[asyncio.Task[None], int] = {}  # evicted models still unloading: the bytes they hold

    # ---- public API ----

    @property
    def budget_bytes(self) -> int:
        """Memory that resident models may use: configured, else 75% of system memory."""
        gb = self.settings.defaults.memory_budget_gb
        return int(gb * GiB) if gb is not None else int(self._memory_probe().total_bytes * 0.75)

    async def resolve(self, model_id: str) -> ModelSpec:
        """The model's spec: a known id from memory, else a rescan in a worker thread (never blocking the loop)."""
        spec = self.registry.known(model_id) or await asyncio.to_thread(self.registry.resolve, model_id)
        if spec is None:
            raise ModelNotFound(f"the model '{model_id}' does not exist", param="model")
        return spec

    async def lease(self, spec: ModelSpec) -> ModelLease:
        """A lease on the model, loading it (and evicting idle ones) first if needed."""
        deadline = time.monotonic() + self.settings.defaults.timeout
        while True:
            async with self._lock:
                resident = self._resident.get(spec.id)
                if resident is not None and resident.state is ModelState.READY:
                    resident.leases += 1
                    resident.last_used = self._clock()
                    return ModelLease(self, resident)
                if resident is None:
                    resident = self._begin_load(spec)
                task = resident.load_task if resident is not None else None
            if task is not None:
                await asyncio.shield(task)  # a failed load raises here, for every request that waited on it
                continue
            if not await self._room.wait(max(0.0, deadline - time.monotonic())):
                raise NoCapacity(f"no room to load '{spec.id}': every resident model is busy", retry_after=5)

    async def start_generation(self, request: GenerationRequest, spec: ModelSpec) -> Generation:
        """Lease the model, submit the request and wait until the engine accepted the prompt."""
        lease = await self.lease(spec)
        try:
            handle = lease.engine.submit(request)
        except BaseException:
            lease.release()
            raise
        try:
            first = await handle.next_event()
        except BaseException:
            handle.cancel()
            lease.release()
            raise
        if isinstance(first, Failed):
            lease.release()
            raise first.error
        assert isinstance(first, Started), f"engine sent {first!r} before Started"
        return Generation(lease, handle, first)

    async def load(self, model_id: str) -> None:
        """Make a model resident without generating (preload, admin)."""
        (await self.lease(await self.resolve(model_id))).release()

    async def unload(self, model_id: str) -> bool:
        """Unload an idle model now; False when it is not resident or busy."""
        spec = await self.resolve(model_id)
        async with self._lock:
            resident = self._resident.get(spec.id)
            if resident is None or resident.state is not ModelState.READY or resident.leases:
                return False
            self._evict(resident)
        await self._wait_drained()
        return True

    def snapshot(self) -> list[ModelStatus]:
        """An immutable view of residency for status endpoints."""
        return [
            ModelStatus(
                id=r.spec.id,
                state=r.state,
                active_requests=r.leases,
                memory_bytes=r.need_bytes + r.engine.prefix_cache_bytes,
                loaded_at=r.loaded_at,
                last_used=r.last_used or None,
                pinned=r.pinned,
            )
            for r in self._resident.values()
        ]

    def engine_of(self, model_id: str) -> Engine | None:
        r = self._resident.get(model_id)
        return r.engine if r is not None else None

    async def start(self) -> None:
        """Preload `defaults.model` if configured; a failure is logged, the server still serves others."""
        name = self.settings.defaults.model
        if name:
            try:
                await self.load(name)
            except Exception as exc:
                logger.error("preloading '{}' failed: {}", name, exc)

    async def stop(self) -> None:
        async with self._lock:
            for resident in list(self._resident.values()):
                if resident.state is ModelState.READY:
                    self._evict(resident)
        await self._wait_drained()

    # ---- residency, always under self._lock ----

    def _begin_load(self, spec: ModelSpec) -> _Resident | None:
        """Evict what must go and start loading; None when nothing idle can be evicted yet."""
        model_cfg = self.registry.config_for(spec)
        need = estimate_memory_bytes(spec, model_cfg, self.settings.defaults.safety_margin)
        budget = self.budget_bytes
        if need > budget:
            raise InsufficientMemory(
                f"model '{spec.id}' needs {need / GiB:.1f} GiB, more than the {budget / GiB:.1f} GiB memory budget"
            )
        victims = self._plan_room(need)
        if victims is None:
            return None
        for victim in victims:
            self._evict(victim)
        engine = self._engine_factory(spec, self._engine_options(spec))
        resident = _Resident(spec, engine, need, pinned=bool(model_cfg and model_cfg.pinned))
        self._resident[spec.id] = resident
        resident.load_task = asyncio.create_task(self._load(resident))
        return resident

    def _plan_room(self, need: int) -> list[_Resident] | None:
        """Idle models to evict, least recently used first, so that one more model of `need` bytes fits."""
        residents = list(self._resident.values())
        idle = sorted(
            (r for r in residents if r.state is ModelState.READY and r.leases == 0 and not r.pinned),
            key=lambda r: r.last_used,
        )
        used = sum(r.need_bytes + r.engine.prefix_cache_bytes for r in residents)
        count, victims = len(residents), []
        while count + 1 > self.settings.defaults.cache_size or used + need > self.budget_bytes:
            if not idle:
                return None
            victim = idle.pop(0)
            victims.append(victim)
            count -= 1
            used -= victim.need_bytes + victim.engine.prefix_cache_bytes
        return victims

    def _evict(self, resident: _Resident) -> None:
        resident.state = ModelState.DRAINING
        del self._resident[resident.spec.id]
        task = asyncio.create_task(self._stop_engine(resident))
        self._draining[task] = resident.need_bytes + resident.engine.prefix_cache_bytes
        task.add_done_callback(lambda done: self._draining.pop(done, None))

    async def _load(self, resident: _Resident) -> None:
        spec = resident.spec
        await self._wait_for_memory()
        logger.info("loading {} ({:.2f} GiB estimated)", spec.id, resident.need_bytes / GiB)
        started = time.perf_counter()
        try:
            await resident.engine.start()
        except Exception as exc:
            async with self._lock:
                if self._resident.get(spec.id) is resident:
                    del self._resident[spec.id]
            self._room.notify_all()
            if isinstance(exc, ModelLoadFailed):
                raise
            raise ModelLoadFailed(f"model '{spec.id}' could not be loaded: {exc}") from exc
        finally:
            resident.load_task = None
        resident.state = ModelState.READY
        resident.loaded_at = self._clock()
        logger.info("model {} ready in {:.2f}s", spec.id, time.perf_counter() - started)

    async def _stop_engine(self, resident: _Resident) -> None:
        started = time.perf_counter()
        try:
            await resident.engine.stop()
        finally:
            resident.state = ModelState.UNLOADED
            logger.info("unloaded {} in {:.2f}s", resident.spec.id, time.perf_counter() - started)
            self._room.notify_all()

    async def _wait_drained(self) -> None:
        if self._draining:
            await asyncio.gather(*list(self._draining), return_exceptions=True)

    async def _wait_for_memory(self) -> None:
        """Wait for evicted models to finish unloading while their memory is needed: while the resident models (the
        one loading among them) and those still unloading would not fit the budget together.

        A swap that only `cache_size` forces loads the new model while the old one unloads (0.3-0.4 s on an H100
        host, a tenth of the swap, most of it a garbage collection that held the GIL: BENCHMARKS.md, session 12).
        """
        while True:
            unloading = [task for task in self._draining if not task.done()]
            held = sum(r.need_bytes + r.engine.prefix_cache_bytes for r in self._resident.values())
            if not unloading or held + sum(self._draining[t] for t in unloading) <= self.budget_bytes:
                return
            await asyncio.wait(unloading, return_when=asyncio.FIRST_COMPLETED)

    def _release(self, resident: _Resident) -> None:
        resident.leases -= 1
        resident.last_used = self._clock()
        self._room.notify_all()

    def _engine_options(self, spec: ModelSpec) -> EngineOptions:
        d = self.settings.defaults
        prefix_gb = d.prefix_cache_gb if d.prefix_cache_gb is not None else min(4.0, self.budget_bytes * 0.1 / GiB)
        return EngineOptions(
            max_batch_size=d.max_batch_size,
            max_queued=d.max_queued_requests,
            timeout=d.timeout,
            warmup_tokens=d.warmup_tokens,
            prefix_cache_bytes=int(prefix_gb * GiB),
            idle_release_s=d.idle_cache_release_s,
        )


def _default_engine_factory(registry: ModelRegistry) -> EngineFactory:
    def make(spec: ModelSpec, options: EngineOptions) -> Engine:
        cfg = registry.config_for(spec)
        if cfg is None:
            return ModelEngine(spec, options)
        prompts = PromptBuilder(
            family=cfg.family or cfg.chat_template,
            use_builtin=cfg.chat_template is not None,
            template_kwargs=dict(cfg.chat_template_kwargs),
            reasoning=cfg.reasoning_response,
        )
        return ModelEngine(spec, options, prompts)

    return make
