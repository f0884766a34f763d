"""The real ModelEngine on tiny CPU models: cancellation mid-batch, prefix-cache budget, batching."""

from __future__ import annotations

import asyncio
from pathlib import Path

from conftest import REPLIES

from mlx_router.config.discovery import read_model_spec
from mlx_router.core.engine import EngineOptions, ModelEngine, RequestHandle
from mlx_router.core.types import Done, Failed, GenerationRequest, Message, SamplingParams, Started, TextDelta


def request(text: str, max_tokens: int = 40, model: str = "m") -> GenerationRequest:
    return GenerationRequest("r", model, (Message("user", text),), SamplingParams(max_tokens=max_tokens))


async def collect(handle: RequestHandle) -> tuple[str, Done | Failed]:
    parts: list[str] = []
    async for event in handle.events():
        if isinstance(event, TextDelta):
            parts.append(event.text)
        elif isinstance(event, Done | Failed):
            return "".join(parts), event
    raise AssertionError("no final event")


def test_cancelling_one_request_mid_batch_leaves_the_others_intact(model_dir: Path) -> None:
    async def run() -> None:
        engine = ModelEngine(read_model_spec("random", model_dir / "random"), EngineOptions(max_batch_size=8))
        await engine.start()
        solo_text, solo_done = await collect(engine.submit(request("hello there", 60)))
        handles = [engine.submit(request("hello there", 60)) for _ in range(3)]
        victim = handles[1]
        while True:  # wait until the victim streams, i.e. it is in the running batch
            event = await victim.next_event()
            if isinstance(event, TextDelta):
                break
        victim.cancel()
        results = [await collect(h) for h in (handles[0], handles[2])]
        await asyncio.sleep(0.2)
        assert engine.in_flight == 0
        assert engine.peak_batch_size >= 3
        await engine.stop()
        assert isinstance(solo_done, Done) and solo_done.usage.completion_tokens == 60
        for text, done in results:
            assert isinstance(done, Done) and done.finish_reason == "length"
            assert done.usage.completion_tokens == 60
            assert text == solo_text  # greedy output does not depend on the batch around it

    asyncio.run(run())


def test_prefix_cache_never_exceeds_its_budget(model_dir: Path) -> None:
    budget = 300_000  # bytes: two or three of these prompts (KV is allocated in 256-token steps)

    async def run() -> list[int]:
        options = EngineOptions(max_batch_size=4, prefix_cache_bytes=budget)
        engine = ModelEngine(read_model_spec("alpha", model_dir / "alpha"), options)
        await engine.start()
        sizes = []
        cached = []
        for i in range(12):
            prompt = f"conversation number {i}: " + "tell me more about this topic please " * (5 + i)
            handle = engine.submit(request(prompt))
            started = await handle.next_event()
            assert isinstance(started, Started)
            cached.append(started.cached_tokens)
            text, done = await collect(handle)
            assert text == REPLIES["alpha"] and isinstance(done, Done)
            sizes.append(engine.prefix_cache_bytes)
        again = engine.submit(request(prompt))
        started = await again.next_event()
        await collect(again)
        await engine.stop()
        assert isinstance(started, Started) and started.cached_tokens > 0  # the newest entry survived
        return sizes

    sizes = asyncio.run(run())
    assert max(sizes) <= budget
    assert max(sizes) > 0


def test_context_too_long_fails_the_request_not_the_engine(model_dir: Path) -> None:
    async def run() -> None:
        engine = ModelEngine(read_model_spec("tiny-ctx", model_dir / "tiny-ctx"), EngineOptions())
        await engine.start()
        failed = await engine.submit(request("word " * 300)).next_event()
        text, done = await collect(engine.submit(request("short")))
        await engine.stop()
        assert isinstance(failed, Failed) and failed.error.code == "context_length_exceeded"  # type: ignore[attr-defined]
        assert text == REPLIES["alpha"] and isinstance(done, Done)

    asyncio.run(run())
