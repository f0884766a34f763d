"""Hot swapping, run-time discovery, disconnects, batching, queue limits and the prefix cache, end to end."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import openai
from conftest import REPLIES, make_settings, never_eos, run_server

from helper_tools.tiny_models import build_scripted_model

USER = [{"role": "user", "content": "Say something."}]


def aclient(srv: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def wait_until(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def test_swap_three_models_with_cache_size_2_under_30_concurrent_requests(serve: Any) -> None:
    names = ["alpha", "bravo", "charlie"] * 10

    async def run(srv: Any) -> list[tuple[str, str | None, bool]]:
        c = aclient(srv)

        async def one(i: int, name: str) -> tuple[str, str | None, bool]:
            if i % 2:
                r = await c.chat.completions.create(model=name, messages=USER)
                return name, r.choices[0].message.content, r.model == name
            parts = [
                ch.choices[0].delta.content or ""
                async for ch in await c.chat.completions.create(model=name, messages=USER, stream=True)
                if ch.choices
            ]
            return name, "".join(parts), True

        return await asyncio.gather(*(one(i, n) for i, n in enumerate(names)))

    with serve(cache_size=2) as srv:
        results = asyncio.run(run(srv))
        resident = [s for s in srv.manager.snapshot() if s.state.value == "ready"]
    assert len(results) == 30
    for name, text, model_ok in results:
        assert text == REPLIES[name], f"{name} answered {text!r}"
        assert model_ok
    assert len(resident) <= 2


def test_a_model_added_while_running_is_found(model_dir: Path, tmp_path: Path) -> None:
    with run_server(make_settings(model_dir, tmp_path)) as srv:
        url = srv.base_url + "/v1/chat/completions"
        assert httpx.post(url, json={"model": "delta", "messages": USER}, timeout=30).status_code == 404
        build_scripted_model(model_dir / "delta", "Delta arrived late.")
        try:
            ok = wait_until(
                lambda: httpx.post(url, json={"model": "delta", "messages": USER}, timeout=30).status_code == 200
            )
            r = httpx.post(url, json={"model": "delta", "messages": USER}, timeout=30)
            listed = [m["id"] for m in httpx.get(srv.base_url + "/v1/models").json()["data"]]
        finally:
            for f in (model_dir / "delta").iterdir():
                f.unlink()
            (model_dir / "delta").rmdir()
    assert ok
    assert r.json()["choices"][0]["message"]["content"] == "Delta arrived late."
    assert "delta" in listed


def test_client_disconnect_frees_the_engine_for_the_next_request(serve: Any, model_dir: Path) -> None:
    body = {"model": "random", "messages": USER, "stream": True, "max_tokens": 1500, "logit_bias": never_eos(model_dir)}
    with serve(max_batch_size=1, max_queued_requests=1) as srv:
        with httpx.stream("POST", srv.base_url + "/v1/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        engine = srv.manager.engine_of("random")
        assert engine is not None
        assert wait_until(lambda: engine.in_flight == 0), "the dropped stream still holds its slot"
        assert wait_until(lambda: all(s.active_requests == 0 for s in srv.manager.snapshot()))
        r2 = httpx.post(srv.base_url + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 5})
    assert r2.status_code == 200
    assert r2.json()["usage"]["completion_tokens"] == 5


def test_concurrent_requests_share_a_batch_and_outputs_are_unchanged(serve: Any) -> None:
    async def run(srv: Any) -> list[str | None]:
        c = aclient(srv)
        calls = [c.chat.completions.create(model="bravo", messages=USER) for _ in range(12)]
        return [r.choices[0].message.content for r in await asyncio.gather(*calls)]

    with serve(max_batch_size=8) as srv:
        texts = asyncio.run(run(srv))
        engine = srv.manager.engine_of("bravo")
        peak = engine.peak_batch_size if engine else 0
    assert texts == [REPLIES["bravo"]] * 12
    assert peak > 1, "concurrent requests of one model must be decoded together"


def test_queue_full_is_429_with_retry_after(serve: Any, model_dir: Path) -> None:
    body = {"model": "random", "messages": USER, "max_tokens": 1500, "stream": True, "logit_bias": never_eos(model_dir)}
    with serve(max_batch_size=1, max_queued_requests=1) as srv:
        url = srv.base_url + "/v1/chat/completions"
        with (
            httpx.stream("POST", url, json=body, timeout=30) as first,
            httpx.stream("POST", url, json=body, timeout=30) as second,
        ):
            assert first.status_code == 200 and second.status_code == 200
            third = httpx.post(url, json=body, timeout=30)
    assert third.status_code == 429
    assert third.headers["retry-after"]
    assert third.json()["error"]["code"] == "overloaded"


def test_second_turn_reuses_the_prefix_cache_with_identical_output(serve: Any) -> None:
    turn1 = [{"role": "system", "content": "You are terse. " * 20}, {"role": "user", "content": "First question?"}]

    def ask(srv: Any, messages: list[Any]) -> dict[str, Any]:
        r = httpx.post(srv.base_url + "/v1/chat/completions", json={"model": "alpha", "messages": messages}, timeout=30)
        return dict(r.json())

    with serve() as srv:
        first = ask(srv, turn1)
        turn2 = [*turn1, first["choices"][0]["message"], {"role": "user", "content": "And a second?"}]
        second = ask(srv, turn2)
    with serve(prefix_cache_gb=0) as srv:
        uncached = ask(srv, turn2)
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > first["usage"]["prompt_tokens"] // 2
    assert uncached["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["choices"][0]["message"] == uncached["choices"][0]["message"]
