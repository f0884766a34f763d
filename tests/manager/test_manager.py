"""The real MLXModelManager with scripted fake engines: LRU order, memory budget, leases, races, failures."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, ClassVar

import pytest

from mlx_router.config.discovery import ModelSpec
from mlx_router.config.settings import Settings, load_settings
from mlx_router.core.engine import EngineOptions
from mlx_router.core.errors import InsufficientMemory, ModelLoadFailed, NoCapacity
from mlx_router.core.handles import RequestHandle
from mlx_router.core.manager import MLXModelManager
from mlx_router.core.memory import MemorySnapshot
from mlx_router.core.types import Done, GenerationRequest, Message, SamplingParams, Started, TextDelta, Usage

GiB = 1024**3


class FakeEngine:
    """Loads after an optional gate; answers every request with its model id."""

    log: ClassVar[list[str]] = []
    made: ClassVar[list[FakeEngine]] = []
    stop_gate: ClassVar[asyncio.Event | None] = None  # when set, stop() waits for it, as a slow teardown would

    def __init__(self, spec: ModelSpec, options: EngineOptions) -> None:
        self.spec = spec
        self.options = options
        FakeEngine.made.append(self)
        self.in_flight = 0
        self.prefix_cache_bytes = 0

    async def start(self) -> None:
        FakeEngine.log.append(f"load {self.spec.id}")
        await asyncio.sleep(0.01)
        if self.spec.id.startswith("fail"):
            raise ModelLoadFailed(f"model '{self.spec.id}' could not be loaded: corrupt weights")

    def submit(self, request: GenerationRequest) -> RequestHandle:
        handle = RequestHandle(request, asyncio.get_running_loop())
        for event in (Started(3), TextDelta(self.spec.id), Done("stop", Usage(3, 1))):
            handle.push(event)
        return handle

    async def stop(self) -> None:
        FakeEngine.log.append(f"unload {self.spec.id}")
        if FakeEngine.stop_gate is not None:
            await FakeEngine.stop_gate.wait()
            FakeEngine.log.append(f"unloaded {self.spec.id}")


def write_models(root: Path, names: list[str]) -> None:
    for name in names:
        folder = root / name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 128}))
        (folder / "tokenizer.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"0" * 1024)


def settings(root: Path, **defaults: Any) -> Settings:
    models = defaults.pop("models", {})
    path = root / "config.json"
    path.write_text(json.dumps({"defaults": {"model_directory": str(root / "m"), **defaults}, "models": models}))
    return load_settings(path, environ={})


def manager(tmp_path: Path, **defaults: Any) -> MLXModelManager:
    write_models(tmp_path / "m", ["a", "b", "c", "fail-x"])
    FakeEngine.log, FakeEngine.made, FakeEngine.stop_gate = [], [], None
    return MLXModelManager(
        settings(tmp_path, **defaults),
        engine_factory=FakeEngine,
        memory_probe=lambda: MemorySnapshot(64 * GiB, 32 * GiB),
    )


def request(model: str) -> GenerationRequest:
    return GenerationRequest("r", model, (Message("user", "hi"),), SamplingParams(max_tokens=5))


async def use(mgr: MLXModelManager, model: str) -> str:
    generation = await mgr.start_generation(request(model), await mgr.resolve(model))
    texts = [e.text async for e in generation.events() if isinstance(e, TextDelta)]
    return "".join(texts)


def resident(mgr: MLXModelManager) -> list[str]:
    return sorted(s.id for s in mgr.snapshot())


def test_lru_evicts_the_least_recently_used_idle_model(tmp_path: Path) -> None:
    async def run() -> None:
        mgr = manager(tmp_path, cache_size=2)
        assert await use(mgr, "a") == "a"
        await use(mgr, "b")
        await use(mgr, "a")  # b is now the least recently used
        await use(mgr, "c")
        assert resident(mgr) == ["a", "c"]
        assert "unload b" in FakeEngine.log and "unload a" not in FakeEngine.log
        await mgr.stop()
        assert resident(mgr) == []

    asyncio.run(run())


def test_memory_budget_evicts_even_below_cache_size(tmp_path: Path) -> None:
    models = {name: {"required_memory_gb": 0.6} for name in "abc"}

    async def run() -> None:
        mgr = manager(tmp_path, cache_size=5, memory_budget_gb=1.0, models=models)
        await use(mgr, "a")
        await use(mgr, "b")
        assert resident(mgr) == ["b"]
        await mgr.stop()

    asyncio.run(run())


def test_a_swap_that_only_the_model_count_forces_loads_while_the_old_model_unloads(tmp_path: Path) -> None:
    async def run() -> None:
        mgr = manager(tmp_path, cache_size=1)
        await use(mgr, "a")
        FakeEngine.stop_gate = gate = asyncio.Event()
        assert await asyncio.wait_for(use(mgr, "b"), 5) == "b"  # answered while a's teardown still runs
        assert FakeEngine.log == ["load a", "unload a", "load b"]
        assert resident(mgr) == ["b"]
        gate.set()
        await mgr.stop()
        assert FakeEngine.log == ["load a", "unload a", "load b", "unloaded a", "unload b", "unloaded b"]

    asyncio.run(run())


def test_a_swap_that_needs_the_old_models_memory_waits_for_its_unload(tmp_path: Path) -> None:
    models = {name: {"required_memory_gb": 0.6} for name in "abc"}

    async def run() -> None:
        mgr = manager(tmp_path, cache_size=5, memory_budget_gb=1.0, models=models)
        await use(mgr, "a")
        FakeEngine.stop_gate = gate = asyncio.Event()
        b = asyncio.create_task(use(mgr, "b"))
        await asyncio.sleep(0.05)
        assert FakeEngine.log == ["load a", "unload a"] and not b.done()
        gate.set()
        assert await b == "b"
        assert FakeEngine.log == ["load a", "unload a", "unloaded a", "load b"]
        await mgr.stop()

    asyncio.run(run())


def test_a_model_larger_than_the_budget_is_refused(tmp_path: Path) -> None:
    async def run() -> None:
        mgr = manager(tmp_path, memory_budget_gb=1.0, models={"a": {"required_memory_gb": 2}})
        with pytest.raises(InsufficientMemory, match=r"2\.0 GiB"):
            await use(mgr, "a")

    asyncio.run(run())


def test_concurrent_requests_for_one_model_load_it_once(tmp_path: Path) -> None:
    async def run() -> None:
        mgr = manager(tmp_path)
        texts = await asyncio.gather(*(use(mgr, "a") for _ in range(20)))
        assert texts == ["a"] * 20
        assert FakeEngine.log.count("load a") == 1
        await mgr.stop()

    asyncio.run(run())


def test_a_leased_model_is_never_evicted_and_waiters_get_room_when_released(tmp_path: Path) -> None:
    async def run() -> None:
        mgr = manager(tmp_path, cache_size=2)
        lease_a = await mgr.lease(await mgr.resolve("a"))
        lease_b = await mgr.lease(await mgr.resolve("b"))
        waiting = asyncio.create_task(use(mgr, "c"))
        await asyncio.sleep(0.1)
        assert not waiting.done() and resident(mgr) == ["a", "b"]
        lease_a.release()
        lease_a.release()  # idempotent
        assert await asyncio.wait_for(waiting, 5) == "c"
        assert resident(mgr) == ["b", "c"]
        lease_b.release()
        await mgr.stop()

    asyncio.run(run())


def test_waiting_for_room_times_out_with_no_capacity(tmp_path: Path) -> None:
    async def run() -> None:
        mgr = manager(tmp_path, cache_size=1, timeout=0.2)
        lease = await mgr.lease(await mgr.resolve("a"))
        with pytest.raises(NoCapacity):
            await use(mgr, "b")
        lease.release()
        assert await use(mgr, "b") == "b"
        await mgr.stop()

    asyncio.run(run())


def test_pinned_models_are_never_evicted(tmp_path: Path) -> None:
    async def run() -> None:
        mgr = manager(tmp_path, cache_size=2, models={"a": {"pinned": True}})
        await use(mgr, "a")
        await use(mgr, "b")
        await use(mgr, "c")
        assert resident(mgr) == ["a", "c"]
        assert [s.pinned for s in mgr.snapshot() if s.id == "a"] == [True]
        await mgr.stop()

    asyncio.run(run())


def test_a_failed_load_leaves_the_others_serving(tmp_path: Path) -> None:
    async def run() -> None:
        mgr = manager(tmp_path, cache_size=2)
        await use(mgr, "a")
        results = await asyncio.gather(*(use(mgr, "fail-x") for _ in range(3)), return_exceptions=True)
        assert all(isinstance(r, ModelLoadFailed) for r in results)
        assert FakeEngine.log.count("load fail-x") == 1
        assert resident(mgr) == ["a"]
        assert await use(mgr, "a") == "a"
        with pytest.raises(ModelLoadFailed):  # a later request tries again rather than caching the failure
            await use(mgr, "fail-x")
        assert FakeEngine.log.count("load fail-x") == 2
        await mgr.stop()

    asyncio.run(run())


def test_unload_frees_an_idle_model(tmp_path: Path) -> None:
    async def run() -> None:
        mgr = manager(tmp_path)
        await use(mgr, "a")
        assert await mgr.unload("a") is True
        assert resident(mgr) == []
        assert await mgr.unload("a") is False

    asyncio.run(run())


@pytest.mark.parametrize(("configured", "expected"), [({}, 2.0), ({"idle_cache_release_s": None}, None)])
def test_engines_get_the_idle_cache_release_setting(
    tmp_path: Path, configured: dict[str, Any], expected: float | None
) -> None:
    async def run() -> None:
        mgr = manager(tmp_path, **configured)
        await use(mgr, "a")
        assert [e.options.idle_release_s for e in FakeEngine.made] == [expected]
        await mgr.stop()

    asyncio.run(run())
