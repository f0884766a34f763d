"""The real ModelEngine on tiny CPU models: cancellation mid-batch, prefix-cache budget, batching, and the
single-stream fast path with its moves into and out of the batch."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import REPLIES, never_eos

from mlx_router.config.discovery import read_model_spec
from mlx_router.core.engine import EngineOptions, ModelEngine
from mlx_router.core.errors import ModelLoadFailed
from mlx_router.core.handles import RequestHandle
from mlx_router.core.types import (
    Done,
    Event,
    Failed,
    GenerationRequest,
    Message,
    SamplingParams,
    Started,
    TextDelta,
)


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


class _Pin:
    """Holds a model in a reference cycle (itself, the model, and the model's attribute back to it)."""

    def __init__(self, model: Any) -> None:
        self.model, self.me = model, self


@pytest.mark.parametrize("in_a_cycle", [False, True])
def test_a_stopped_engine_frees_its_model_and_walks_the_frozen_heap_only_for_a_cycle(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, in_a_cycle: bool
) -> None:
    """Unfreezing brings back every object frozen since start-up for a full collection (0.25 s on a GPU host, with
    the GIL held through a swap); reference counting frees a model that no cycle holds."""
    import gc
    import weakref

    import mlx.core as mx

    from mlx_router.core import engine as engine_module

    real_fuse, real_unfreeze = engine_module.fuse_projections, gc.unfreeze
    models: list[Callable[[], object]] = []
    unfreezes: list[int] = []

    def fuse(model: Any) -> None:
        if in_a_cycle:
            model._pin = _Pin(model)
        models.append(weakref.ref(model))
        real_fuse(model)

    monkeypatch.setattr(engine_module, "fuse_projections", fuse)
    monkeypatch.setattr(gc, "unfreeze", lambda: unfreezes.append(1) or real_unfreeze())

    async def run() -> None:
        engine = ModelEngine(read_model_spec("random", model_dir / "random"), EngineOptions())
        await engine.start()
        text, done = await collect(engine.submit(request("hello there", 5)))
        assert isinstance(done, Done) and text
        await engine.stop()

    weights = sum(f.stat().st_size for f in (model_dir / "random").glob("*.safetensors"))
    before = mx.get_active_memory()
    asyncio.run(run())
    assert mx.get_active_memory() - before < weights / 10  # the weights, KV caches and prefix cache are all gone
    assert len(models) == 1 and models[0]() is None
    assert unfreezes == ([1] if in_a_cycle else [])


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


def test_a_short_shared_head_is_prefilled_again_not_served_from_cache(model_dir: Path) -> None:
    # Prompts that share only the chat template's opening tokens: reusing those few is not worth a cache entry's
    # copy, so both report no cached tokens; the exact prompt again reuses all but its last token.
    async def run() -> list[int]:
        engine = ModelEngine(read_model_spec("alpha", model_dir / "alpha"), EngineOptions())
        await engine.start()
        cached = []
        for text in ("first " * 40, "second " * 40, "second " * 40):
            handle = engine.submit(request(text))
            started = await handle.next_event()
            assert isinstance(started, Started)
            cached.append(started.cached_tokens)
            await collect(handle)
        await engine.stop()
        return cached

    first, other, same = asyncio.run(run())
    assert first == 0 and other == 0 and same > 64


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


# ---- the single-stream fast path and moves between it and the batch ----


def sampled(model_dir: Path, text: str, max_tokens: int, *, bias: bool = False, **kw: Any) -> GenerationRequest:
    """A random-model request; `bias` keeps it off EOS so it runs its whole budget."""
    logit_bias = tuple((int(t), b) for t, b in never_eos(model_dir).items()) if bias else ()
    sampling = SamplingParams(max_tokens=max_tokens, logit_bias=logit_bias, **kw)
    return GenerationRequest("r", "random", (Message("user", text),), sampling)


async def until_text(handle: RequestHandle) -> list[Event]:
    """Events up to the first text, i.e. until the request is decoding."""
    events = [await handle.next_event()]
    while not isinstance(events[-1], TextDelta):
        events.append(await handle.next_event())
    return events


async def rest(handle: RequestHandle, events: list[Event] | None = None) -> list[Event]:
    events = list(events or [])
    async for event in handle.events():
        events.append(event)
    return events


def text_of(events: list[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


async def alone_batched_migrated(engine: ModelEngine, make: Callable[[], GenerationRequest]) -> list[list[Event]]:
    """The same request run alone, two at once, and first alone then joined by a second one mid-decode."""
    runs = [await rest(engine.submit(make()))]
    assert engine.moves_to_batch == 0  # nothing else ran, so it stayed on the fast path
    pair = [engine.submit(make()) for _ in range(2)]
    runs += [await rest(h) for h in pair]
    first = engine.submit(make())
    seen = await until_text(first)
    second = engine.submit(make())
    runs += [await rest(first, seen), await rest(second)]
    assert engine.moves_to_batch >= 1  # the first left the fast path when the second arrived
    assert engine.moves_to_solo >= 1  # and whichever was left alone went back to it
    assert engine.in_flight == 0
    return runs


def three_ways(model_dir: Path, make: Callable[[], GenerationRequest]) -> list[list[Event]]:
    """The same request run alone, batched and moved mid-decode, on a fresh engine over the random model."""

    async def run() -> list[list[Event]]:
        engine = ModelEngine(read_model_spec("random", model_dir / "random"), EngineOptions(max_batch_size=8))
        await engine.start()
        runs = await alone_batched_migrated(engine, make)
        await engine.stop()
        return runs

    return asyncio.run(run())


def test_greedy_tokens_are_the_same_alone_batched_and_moved_mid_decode(model_dir: Path) -> None:
    # A penalty reads the token history, so the history must also survive the moves.
    runs = three_ways(model_dir, lambda: sampled(model_dir, "hello there", 120, bias=True, frequency_penalty=0.5))
    for events in runs:
        done = events[-1]
        assert isinstance(done, Done) and done.finish_reason == "length" and done.usage.completion_tokens == 120
        assert text_of(events) == text_of(runs[0])  # no token lost or repeated by a move


def test_logprobs_are_the_same_alone_batched_and_moved(model_dir: Path) -> None:
    runs = three_ways(model_dir, lambda: sampled(model_dir, "hello there", 60, logprobs=True, top_logprobs=3))
    first = [lp for e in runs[0] if isinstance(e, TextDelta) for lp in e.logprobs]
    assert len(first) > 1 and all(len(lp.top) == 3 for lp in first)
    for events in runs[1:]:
        logprobs = [lp for e in events if isinstance(e, TextDelta) for lp in e.logprobs]
        assert [lp.token for lp in logprobs] == [lp.token for lp in first]
        assert [[t.token for t in lp.top] for lp in logprobs] == [[t.token for t in lp.top] for lp in first]
        assert [lp.logprob for lp in logprobs] == pytest.approx([lp.logprob for lp in first], abs=1e-4)


def test_a_request_moved_during_its_prefill_finishes_intact(model_dir: Path) -> None:
    long = "tell me more about this topic please " * 40  # many prefill chunks of 4 tokens

    async def run() -> list[list[Event]]:
        options = EngineOptions(max_batch_size=4, prefill_step_size=4)
        engine = ModelEngine(read_model_spec("alpha", model_dir / "alpha"), options)
        await engine.start()
        first = engine.submit(request(f"one {long}"))
        started = await first.next_event()  # admitted, still prefilling
        second = engine.submit(request(f"two {long}"))
        runs = [await rest(first, [started]), await rest(second)]
        assert engine.moves_to_batch == 1
        await engine.stop()
        return runs

    for events in asyncio.run(run()):
        assert isinstance(events[-1], Done) and text_of(events) == REPLIES["alpha"]


def test_stop_strings_end_the_fast_path_like_the_batch(model_dir: Path) -> None:
    def make() -> GenerationRequest:
        return GenerationRequest("r", "m", (Message("user", "hi"),), SamplingParams(max_tokens=40, stop=("fox",)))

    async def run() -> list[list[Event]]:
        engine = ModelEngine(read_model_spec("alpha", model_dir / "alpha"), EngineOptions())
        await engine.start()
        runs = [await rest(engine.submit(make()))]
        pair = [engine.submit(make()) for _ in range(2)]
        runs += [await rest(h) for h in pair]
        assert engine.in_flight == 0
        await engine.stop()
        return runs

    for events in asyncio.run(run()):
        done = events[-1]
        assert isinstance(done, Done) and done.finish_reason == "stop"
        assert text_of(events) == REPLIES["alpha"].split("fox")[0]


def test_cancelling_a_lone_request_frees_the_engine(model_dir: Path) -> None:
    async def run() -> None:
        engine = ModelEngine(read_model_spec("random", model_dir / "random"), EngineOptions())
        await engine.start()
        handle = engine.submit(sampled(model_dir, "hello there", 1500, bias=True))
        await until_text(handle)
        handle.cancel()
        for _ in range(500):  # the engine drops it at its next step
            if engine.in_flight == 0:
                break
            await asyncio.sleep(0.02)
        assert engine.in_flight == 0 and engine.moves_to_batch == 0
        _, done = await collect(engine.submit(request("hello there", 5)))
        await engine.stop()
        assert isinstance(done, Done) and done.usage.completion_tokens <= 5

    asyncio.run(run())


def test_a_lone_request_times_out(model_dir: Path) -> None:
    async def run() -> None:
        engine = ModelEngine(read_model_spec("random", model_dir / "random"), EngineOptions(timeout=0.2))
        await engine.start()
        events = await rest(engine.submit(sampled(model_dir, "hello there", 1900, bias=True)))
        await engine.stop()
        failed = events[-1]
        assert isinstance(failed, Failed) and failed.error.code == "timeout"  # type: ignore[attr-defined]
        assert engine.in_flight == 0 and engine.moves_to_batch == 0

    asyncio.run(run())


def test_prefix_cache_entries_own_their_memory() -> None:
    # A row taken out of a batch is a view of the whole batch's KV buffer; the entry kept for later prompts must
    # not pin that buffer, or the prefix cache holds far more memory than its budget counts.
    import gc

    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    from mlx_router.core.prefix_cache import own_kv

    batch = mx.zeros((32, 2, 512, 16))
    mx.eval(batch)
    size = batch.nbytes
    row = KVCache()
    row.keys, row.values, row.offset = batch[3:4, :, :100, :], batch[3:4, :, :100, :], 100
    before = mx.get_active_memory()
    (kept,) = own_kv([row])
    mx.eval(kept.keys, kept.values)
    del batch, row
    gc.collect()
    assert kept.keys.shape == (1, 2, 100, 16)
    assert before - mx.get_active_memory() >= size * 0.9  # the batch buffer is gone; two 12.8 kB rows remain


def test_a_failed_step_fails_the_running_requests_and_the_engine_serves_on(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Out of memory in a decode step: the requests in that batch get an error, the model stays loaded and serves.
    from mlx_lm.generate import BatchGenerator

    real_next = BatchGenerator.next
    calls = {"n": 0}

    def next_or_fail(self: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("cudaMallocAsync failed: out of memory")
        return real_next(self)

    monkeypatch.setattr(BatchGenerator, "next", next_or_fail)

    async def run() -> None:
        engine = ModelEngine(read_model_spec("alpha", model_dir / "alpha"), EngineOptions(max_batch_size=4))
        await engine.start()
        failed = await asyncio.gather(*(collect(engine.submit(request("hello", 30))) for _ in range(2)))
        text, done = await collect(engine.submit(request("hello again", 30)))
        await asyncio.sleep(0.1)
        assert engine.in_flight == 0
        await engine.stop()
        for _, event in failed:
            assert isinstance(event, Failed) and "out of memory" in str(event.error)
        assert isinstance(done, Done) and text == REPLIES["alpha"]

    asyncio.run(run())


def test_a_finished_answer_is_delivered_even_if_keeping_its_cache_fails(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlx_router.core.prefix_cache import PrefixCache

    def no_memory(*_: Any) -> None:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(PrefixCache, "keep", no_memory)

    async def run() -> list[tuple[str, Done | Failed]]:
        engine = ModelEngine(read_model_spec("alpha", model_dir / "alpha"), EngineOptions(max_batch_size=4))
        await engine.start()
        results = [await collect(engine.submit(request("hello")))]  # alone: the fast path
        results += await asyncio.gather(*(collect(engine.submit(request("hi"))) for _ in range(2)))  # batched
        await engine.stop()
        return results

    for text, done in asyncio.run(run()):
        assert isinstance(done, Done) and done.finish_reason == "stop" and text == REPLIES["alpha"]


@pytest.mark.parametrize("decoding", [True, False], ids=["mid-decode", "mid-prefill"])
def test_a_moved_sequence_does_not_pad_the_prompts_that_arrive_with_it(model_dir: Path, decoding: bool) -> None:
    # In one prompt batch with new prompts, the moved sequence's KV cache would be merged with theirs and every new
    # prompt left-padded to its length: double the prefill work and new kernel shapes (seconds on CUDA).
    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import greedy_sampler

    from mlx_router.core.single_stream import SoloStream

    model, tokenizer = load(str(model_dir / "random"))[:2]
    gen = BatchGenerator(model, stop_tokens=[], prefill_batch_size=8, prefill_step_size=4)
    prompt = tokenizer.encode("a fairly long first prompt that takes several prefill chunks to read")
    solo = SoloStream(
        gen, cache=None, tokens=[], rest=prompt, max_tokens=20, sampler=greedy_sampler, logits_processors=[],
        stop_tokens=(),
    )  # fmt: skip
    solo.advance()  # one prefill chunk
    last = None
    if decoding:
        while solo.advance() is None:
            pass
        last = solo.take_pending()[0]
    uid = solo.to_batch(gen, last)
    assert gen._generation_batch.uids == [uid] and len(gen._prompt_batch) == 0
    gen.insert([tokenizer.encode("a new prompt of some twenty tokens or so, read in chunks of four")], max_tokens=[4])
    gen.next()
    assert len(gen._prompt_batch) == 1
    assert gen._prompt_batch.prompt_cache[0].left_padding.tolist() == [0]
    gen.close()


def test_a_failed_move_into_the_batch_ends_only_the_moved_request(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlx_router.core.single_stream import SoloStream

    real_to_batch = SoloStream.to_batch
    failed: list[bool] = []

    def insert_then_fail(self: SoloStream, gen: Any, last_token: int | None) -> int:
        uid = real_to_batch(self, gen, last_token)  # the sequence is in the generator when the failure comes
        if failed:  # only the first move fails: the newcomers may reach the engine one tick apart, and then the
            return uid  # first of them runs alone and moves into the batch when the second arrives
        failed.append(True)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(SoloStream, "to_batch", insert_then_fail)

    async def run() -> None:
        engine = ModelEngine(read_model_spec("random", model_dir / "random"), EngineOptions(max_batch_size=4))
        await engine.start()
        lone = engine.submit(sampled(model_dir, "hello there", 200, bias=True))
        await until_text(lone)  # decoding alone on the fast path
        newcomers = [engine.submit(sampled(model_dir, "hi", 20, bias=True)) for _ in range(2)]
        _, moved = await collect(lone)
        results = [await collect(h) for h in newcomers]
        await asyncio.sleep(0.1)
        assert engine.in_flight == 0
        assert engine.peak_batch_size == 2  # the orphaned sequence was not decoded beside the newcomers
        await engine.stop()
        assert isinstance(moved, Failed) and "out of memory" in str(moved.error)
        for _, done in results:
            assert isinstance(done, Done) and done.usage.completion_tokens == 20

    asyncio.run(run())


@contextmanager
def stepped_worker(model_dir: Path, options: EngineOptions, name: str = "random") -> Iterator[tuple[ModelEngine, Any]]:
    """An engine's worker driven step by step on this thread (`engine._tick`), so the timing is exact."""
    from mlx_lm import load

    engine = ModelEngine(read_model_spec(name, model_dir / name), options)
    model, tokenizer = load(str(model_dir / name))[:2]
    loop = asyncio.new_event_loop()
    w = engine._new_worker(model, tokenizer, loop)
    try:
        yield engine, w
    finally:
        w.gen.close()
        loop.close()


@pytest.mark.parametrize("hold", [50, 2])
def test_new_prompts_wait_until_the_prompt_batch_has_read_its_prompts(model_dir: Path, hold: int) -> None:
    # A prompt added to a prompt batch part-way through its chunks is left-padded at every chunk, and the batch's
    # KV caches are rolled at the end (on CUDA the slowest part of long concurrent prompts). The engine holds it,
    # at most `max_prefill_hold` steps.
    from mlx_router.core.prefill import prefill_in_progress

    options = EngineOptions(max_batch_size=8, prefill_step_size=4, max_prefill_hold=hold)
    with stepped_worker(model_dir, options) as (engine, w):
        long_prompt = "a long prompt that takes the prefill many chunks of four tokens to read, number "
        loop = w.outbox._loop
        engine._tick(w, [RequestHandle(request(long_prompt + str(i), 5), loop) for i in range(2)])
        assert len(w.batch) == 2 and prefill_in_progress(w.gen)
        late = RequestHandle(request(long_prompt + "3", 5), loop)
        engine._tick(w, [late])
        steps, reading = 1, True
        while w.waiting:
            reading = prefill_in_progress(w.gen)
            engine._tick(w, [])
            steps += 1
        assert len(w.batch) == 3
        if hold == 2:
            assert steps == 3 and reading  # admitted at the limit although the first prompts were still being read
        else:
            assert steps > 3 and not reading
            assert w.gen._prompt_batch.prompt_cache[0].left_padding.tolist() == [0]  # a prompt batch of its own
        while w.batch:
            engine._tick(w, [])


def test_a_prompt_batch_is_not_topped_up_while_its_read_prompts_wait_to_decode(model_dir: Path) -> None:
    # Prompts added to a prompt batch whose prompts are read would be merged into its KV caches and split out again
    # as strided views of them: on the H200 a pass of 16 prompts then took 102 ms instead of 48 ms.
    with stepped_worker(model_dir, EngineOptions(max_batch_size=16)) as (engine, w):
        loop = w.outbox._loop
        engine._tick(w, [RequestHandle(request(f"short prompt {i}", 5), loop) for i in range(2)])
        assert len(w.gen._prompt_batch) == 2  # read, waiting for their first decoding step
        engine._tick(w, [RequestHandle(request(f"later prompt {i}", 5), loop) for i in range(8)])
        assert len(w.waiting) == 8 and len(w.gen._prompt_batch) == 0
        engine._tick(w, [])
        assert not w.waiting and len(w.gen._prompt_batch) == 8  # a prompt batch of their own
        while w.batch:
            engine._tick(w, [])


def test_prompts_never_take_the_batch_past_its_size(model_dir: Path) -> None:
    # Once the hold runs out, waiting prompts join a prompt batch under way: no more of them than the batch has room
    # for beside the sequences already decoding.
    options = EngineOptions(max_batch_size=6, prefill_step_size=4, max_prefill_hold=1)
    long_prompt = "a long prompt that takes the prefill many chunks of four tokens to read, number "
    with stepped_worker(model_dir, options) as (engine, w):
        loop = w.outbox._loop
        engine._tick(w, [RequestHandle(request(f"short {i}", 40), loop) for i in range(2)])
        engine._tick(w, [])
        engine._tick(w, [RequestHandle(request(long_prompt + str(i), 5), loop) for i in range(2)])
        engine._tick(w, [RequestHandle(request(long_prompt + str(i), 5), loop) for i in range(2, 7)])
        sizes = []
        while w.batch:
            engine._tick(w, [])
            sizes.append(len(w.gen._generation_batch) + len(w.gen._prompt_batch))
        assert max(sizes) == 6


def test_short_prompts_arriving_together_are_read_in_one_prompt_batch(model_dir: Path) -> None:
    # mlx-lm reads 8 prompts per pass; the engine lets a pass take as many as fit in 8 full chunks' tokens, so a
    # burst of short prompts starts decoding together. Prompts of different lengths share the pass, padded.
    options = EngineOptions(max_batch_size=16, prefill_step_size=64)
    with stepped_worker(model_dir, options, "alpha") as (engine, w):
        loop = w.outbox._loop
        words = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
        handles = [RequestHandle(request(" ".join(words[: i + 1])), loop) for i in range(12)]
        engine._tick(w, handles)
        assert len(w.gen._prompt_batch) == 12
        while w.batch:
            engine._tick(w, [])
        w.outbox.flush()
        loop.run_until_complete(asyncio.sleep(0))  # deliver the events the engine sent to the loop
        for h in handles:
            events = list(h._pending)
            assert isinstance(events[-1], Done) and text_of(events) == REPLIES["alpha"]


def test_long_prompts_are_still_read_eight_at_a_time(model_dir: Path) -> None:
    # Full chunks keep mlx-lm's 8 prompts per pass, and so its peak memory.
    with stepped_worker(model_dir, EngineOptions(max_batch_size=16, prefill_step_size=4)) as (engine, w):
        loop = w.outbox._loop
        long_prompt = "a long prompt that takes the prefill many chunks of four tokens to read, number "
        engine._tick(w, [RequestHandle(request(long_prompt + str(i), 3), loop) for i in range(10)])
        assert len(w.gen._prompt_batch) == 8
        while w.batch:
            engine._tick(w, [])


def test_the_heap_is_frozen_after_a_load_and_after_an_unload(model_dir: Path) -> None:
    # A full collection walks every tracked object (300 ms on the GPU host); what is alive once a model is loaded
    # lives as long as it, so it is kept out of later walks. An unload unfreezes first, so its cycles are freed.
    import gc

    async def run() -> tuple[int, int, int]:
        gc.unfreeze()
        engine = ModelEngine(read_model_spec("random", model_dir / "random"), EngineOptions())
        await engine.start()
        loaded = gc.get_freeze_count()
        _, done = await collect(engine.submit(request("hello there", 5)))
        assert isinstance(done, Done) and done.usage.completion_tokens == 5
        await engine.stop()
        return loaded, gc.get_freeze_count(), len(gc.get_objects())

    loaded, unloaded, tracked = asyncio.run(run())
    assert loaded > 10_000  # modules, the model's tree and the tokenizer
    assert 0 < unloaded < loaded + 10_000
    assert tracked < 10_000  # nothing much left for the collector to walk


def test_an_idle_engine_gives_mlx_cached_buffers_back(model_dir: Path) -> None:
    # Memory of finished work that MLX keeps for reuse is returned after a quiet spell, not held while idle.
    import mlx.core as mx

    async def run() -> tuple[int, int, float]:
        engine = ModelEngine(read_model_spec("random", model_dir / "random"), EngineOptions(idle_release_s=0.5))
        await engine.start()
        _, done = await collect(engine.submit(request("hello there", 8)))
        assert isinstance(done, Done)
        after_work = mx.get_cache_memory()
        t0 = time.monotonic()
        while mx.get_cache_memory() and time.monotonic() - t0 < 10:
            await asyncio.sleep(0.05)
        released_after = time.monotonic() - t0
        left = mx.get_cache_memory()
        await engine.stop()
        return after_work, left, released_after

    after_work, left, released_after = asyncio.run(run())
    assert after_work > 0 and left == 0
    assert 0.2 < released_after < 5  # not at once: back-to-back requests keep reusing the cache


def test_prefill_chunks_are_sized_by_backend(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A GPU pays a fixed launch per chunk (2,048 tokens, mlx-lm's default); on the CPU backend smaller chunks win.
    # An explicit size still wins over both.
    import mlx.core as mx

    with stepped_worker(model_dir, EngineOptions()) as (engine, w):
        assert mx.default_device() == mx.cpu and w.gen.prefill_step_size == 512
        monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)
        assert engine._make_batch_generator(w.model, w.tokenizer).prefill_step_size == 2048
    with stepped_worker(model_dir, EngineOptions(prefill_step_size=64)) as (_, w):
        assert w.gen.prefill_step_size == 64


def test_an_engine_told_never_to_release_keeps_mlx_cached_buffers(model_dir: Path) -> None:
    import mlx.core as mx

    async def run() -> int:
        engine = ModelEngine(read_model_spec("random", model_dir / "random"), EngineOptions(idle_release_s=None))
        await engine.start()
        _, done = await collect(engine.submit(request("hello there", 8)))
        assert isinstance(done, Done)
        await asyncio.sleep(2.6)  # past the default release (2 s, polled every 0.5 s)
        kept = mx.get_cache_memory()
        await engine.stop()
        return kept

    assert asyncio.run(run()) > 0


def _pretend_attention_routed(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Make the engine believe attention is routed (as on CUDA) and count its attention calls by kind."""
    import mlx.core as mx

    import mlx_router.core.engine as engine_module

    calls = {"lone_prefill": 0, "padded_prefill": 0, "masked_decode": 0}
    real_sdpa = mx.fast.scaled_dot_product_attention

    def spy(q: Any, k: Any, v: Any, **kwargs: Any) -> Any:
        mask = kwargs.get("mask")
        if isinstance(mask, str):  # a lone stream's cache (mlx-lm's KVCache) names its mask; a batch's builds an array
            calls["lone_prefill"] += 1
        elif isinstance(mask, mx.array):
            calls["masked_decode" if q.shape[2] == 1 else "padded_prefill"] += 1
        return real_sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(engine_module, "route_attention", lambda: True)
    return calls


def test_where_attention_is_routed_a_load_takes_a_padded_batch_through_prefill_and_decode(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On CUDA, MLX compiles kernels on first use: a load runs a lone stream, then a batch of two prompts of different
    # lengths, so a lone prefill (a named causal mask), the batch's prefill and decode step (masks as arrays; one
    # query: the decode-attention kernel) and a temperature sampler all run once. Pretended here on the CPU.
    import mlx_router.core.sampling as sampling_module

    calls = _pretend_attention_routed(monkeypatch)
    calls["sampled"] = 0
    real_draw = sampling_module._draw

    def draw(*args: Any) -> Any:
        calls["sampled"] += 1
        return real_draw(*args)

    monkeypatch.setattr(sampling_module, "_draw", draw)

    async def run() -> str:
        engine = ModelEngine(read_model_spec("alpha", model_dir / "alpha"), EngineOptions())
        await engine.start()
        assert all(calls.values()), calls
        text, done = await collect(engine.submit(request("hello")))
        await engine.stop()
        assert isinstance(done, Done)
        return text

    assert asyncio.run(run()) == REPLIES["alpha"]


def test_the_warm_up_batch_takes_its_decode_step_even_when_its_first_token_is_an_end_token(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A model may well answer the warm-up's made-up prompts with its end token. The batch still takes a decode step:
    # mlx-lm reads a prompt's last token in one, which is where the first token comes from. Here every token ends a
    # request (mlx-lm 0.32's generator default).
    from mlx_lm.generate import StopSequences

    calls = _pretend_attention_routed(monkeypatch)
    real_make = ModelEngine._make_batch_generator

    def every_token_stops(self: ModelEngine, model: Any, tokenizer: Any) -> Any:
        gen = real_make(self, model, tokenizer)
        gen._default_stop_sequences = StopSequences([[t] for t in range(len(tokenizer.vocab))])
        return gen

    monkeypatch.setattr(ModelEngine, "_make_batch_generator", every_token_stops)

    async def run() -> None:
        engine = ModelEngine(read_model_spec("alpha", model_dir / "alpha"), EngineOptions())
        await engine.start()
        await engine.stop()

    asyncio.run(run())
    assert calls["masked_decode"] > 0


def test_a_failed_warm_up_fails_the_load_instead_of_hanging_it(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*_: Any) -> None:
        raise RuntimeError("out of memory in the warm-up")

    monkeypatch.setattr(ModelEngine, "_warm_up", fail)

    async def run() -> None:
        engine = ModelEngine(read_model_spec("alpha", model_dir / "alpha"), EngineOptions())
        with pytest.raises(ModelLoadFailed, match="out of memory in the warm-up"):
            await asyncio.wait_for(engine.start(), 60)

    asyncio.run(run())


def test_a_model_whose_projections_cannot_be_fused_is_served_as_loaded(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlx_router.core.engine as engine_module

    def fail(_: Any) -> int:
        raise RuntimeError("no room for the concatenated weights")

    monkeypatch.setattr(engine_module, "fuse_projections", fail)

    async def run() -> str:
        engine = ModelEngine(read_model_spec("alpha", model_dir / "alpha"), EngineOptions())
        await asyncio.wait_for(engine.start(), 60)  # an escaped error would leave the load pending: fail, not hang
        text, _ = await collect(engine.submit(request("hello")))
        await engine.stop()
        return text

    assert asyncio.run(run()) == REPLIES["alpha"]
