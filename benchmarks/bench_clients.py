"""The client side of the load: one streamed request, a closed loop of them, and `ClientPool`, which spreads a closed
loop over several processes.

Every request goes through the `openai` SDK (AsyncOpenAI, streaming with `include_usage`, no retries).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, cast

from bench_common import ReqResult
from openai import AsyncOpenAI

Messages = list[dict[str, str]]
LoopResult = tuple[list[ReqResult], float, bool]  # finished requests, wall seconds, timed out


def new_client(base_url: str, timeout: float) -> AsyncOpenAI:
    # No retries: every failed request counts (the SDK's default is 2, with back-off).
    return AsyncOpenAI(base_url=base_url + "/v1", api_key="bench", timeout=timeout, max_retries=0)


async def one_request(client: AsyncOpenAI, model: str, messages: Messages, max_tokens: int, temp: float) -> ReqResult:
    """One streamed chat completion, the same body for every server; chunk arrival times and usage recorded."""
    r = ReqResult(time.perf_counter())
    text: list[str] = []
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=cast(Any, messages),
            max_tokens=max_tokens,
            temperature=temp,
            top_p=1.0,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                r.completion_tokens = chunk.usage.completion_tokens
            for choice in chunk.choices or []:
                if choice.delta is not None and choice.delta.content:
                    r.chunk_times.append(now)
                    text.append(choice.delta.content)
        r.t_end = time.perf_counter()
    except Exception as exc:  # a failing server is reported, never fatal
        r.error = f"{type(exc).__name__}: {str(exc)[:160]}"
    r.text = "".join(text)
    if r.text.lstrip().startswith("ERROR:"):  # mlx-router 2.3.1 reports failures as content
        r.error = r.text.strip()[:160]
    return r


async def closed_loop(
    client: AsyncOpenAI,
    model: str,
    prompts: list[Messages],
    concurrency: int,
    max_tokens: int,
    temp: float,
    timeout_s: float,
) -> LoopResult:
    """`concurrency` workers, each sending its next prompt when its last answer ends. Requests still running at the
    limit are cancelled."""
    results: list[ReqResult] = []
    todo = list(prompts)

    async def worker() -> None:
        while todo:
            results.append(await one_request(client, model, todo.pop(0), max_tokens, temp))

    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(worker()) for _ in range(min(concurrency, len(prompts)))]
    _, running = await asyncio.wait(tasks, timeout=timeout_s)
    for t in running:
        t.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    return results, time.perf_counter() - t0, bool(running)


@dataclass(frozen=True)
class _Share:
    """One client process's part of a closed loop, started at `start_at` (time.perf_counter, which every process of a
    host reads from the same monotonic clock on Linux and macOS)."""

    model: str
    prompts: list[Messages]
    concurrency: int
    max_tokens: int
    temp: float
    timeout_s: float
    start_at: float


class ClientPool:
    """A closed loop spread over `procs` client processes, each with its own event loop and AsyncOpenAI client.

    The SDK spends 1-2 ms of CPU building each request, and in one asyncio process the workers of a level that start
    together send their first bytes only once all of them have built theirs (each yields at the connection pool). At
    concurrency 32 the first request reached the server 50 ms after the level began on a 2-core machine and up to
    150 ms on the GPU host: time that every TTFT and the level's wall time carried, for every server alike, but not
    the raw engine. Load generators such as aiperf and genai-bench spread their clients over processes for the same
    reason. With `procs` 1 the loop runs in this process.
    """

    def __init__(self, procs: int, base_url: str, timeout: float) -> None:
        self.base_url, self.timeout = base_url, timeout
        self.local = new_client(base_url, timeout)
        ctx = mp.get_context("spawn")  # the harness runs threads: never fork it
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        for _ in range(procs if procs > 1 else 0):
            here, there = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(there, base_url, timeout), daemon=True)
            proc.start()
            self._conns.append(here)
            self._procs.append(proc)

    async def closed_loop(
        self, model: str, prompts: list[Messages], concurrency: int, max_tokens: int, temp: float, timeout_s: float
    ) -> LoopResult:
        n = min(len(self._conns), concurrency, len(prompts))
        if n <= 1:
            return await closed_loop(self.local, model, prompts, concurrency, max_tokens, temp, timeout_s)
        start_at = time.perf_counter() + 0.05  # every process is waiting when the level begins
        for j, conn in enumerate(self._conns[:n]):
            share = concurrency // n + (1 if j < concurrency % n else 0)
            conn.send(("run", _Share(model, prompts[j::n], share, max_tokens, temp, timeout_s, start_at)))
        replies = await asyncio.to_thread(self._collect, n, timeout_s + 60)
        results = [r for rs, _, _ in replies for r in rs]
        end = max([t for _, t, _ in replies if t > 0] or [time.perf_counter()])
        return results, end - start_at, any(timed_out for _, _, timed_out in replies)

    def _collect(self, n: int, limit_s: float) -> list[tuple[list[ReqResult], float, bool]]:
        """Each process's (requests, perf_counter at its end or 0.0 when it failed, timed out)."""
        out: list[tuple[list[ReqResult], float, bool]] = []
        for conn in self._conns[:n]:
            reply: Any = conn.recv() if conn.poll(limit_s) else ("error", f"no reply in {limit_s:.0f}s")
            if reply[0] == "ok":
                out.append(reply[1])
            else:  # a failed client process: its requests count as failed, the level goes on
                out.append(([ReqResult(time.perf_counter(), error=f"client process: {reply[1]}")], 0.0, False))
        return out

    async def reconnect(self) -> None:
        """New clients everywhere (after a server restart, whose connections went with the old process)."""
        await self.local.close()
        self.local = new_client(self.base_url, self.timeout)
        for conn in self._conns:
            conn.send(("reset", None))
        await asyncio.to_thread(lambda: [conn.recv() for conn in self._conns if conn.poll(30)])

    async def close(self) -> None:
        await self.local.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):  # a process that died already
                conn.send(("stop", None))
        for proc in self._procs:
            await asyncio.to_thread(proc.join, 10)
            if proc.is_alive():
                proc.kill()


def _serve(conn: Connection, base_url: str, timeout: float) -> None:
    """A client process: runs the closed loops it is sent, on one event loop and one client kept across levels."""
    loop = asyncio.new_event_loop()
    client = new_client(base_url, timeout)
    try:
        while True:
            cmd, share = conn.recv()
            if cmd == "stop":
                return
            if cmd == "reset":
                loop.run_until_complete(client.close())
                client = new_client(base_url, timeout)
                conn.send(("ok", None))
                continue
            try:
                conn.send(("ok", loop.run_until_complete(_run_share(client, share))))
            except Exception as exc:
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        loop.run_until_complete(client.close())
        loop.close()


async def _run_share(client: AsyncOpenAI, s: _Share) -> tuple[list[ReqResult], float, bool]:
    await asyncio.sleep(max(0.0, s.start_at - time.perf_counter()))
    results, _, timed_out = await closed_loop(
        client, s.model, s.prompts, s.concurrency, s.max_tokens, s.temp, s.timeout_s
    )
    return results, time.perf_counter(), timed_out
