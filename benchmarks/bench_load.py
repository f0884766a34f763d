"""Load generator: the `openai` SDK (AsyncOpenAI, streaming, `stream_options.include_usage`) in a closed loop.

Each level sends N requests through `concurrency` workers; every request records its send time, the arrival time
of each content chunk and its token counts (usage when the server sends it, else re-tokenized text).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench_common import median, percentile
from openai import AsyncOpenAI

Messages = list[dict[str, str]]


@dataclass
class ReqResult:
    t_send: float
    t_first: float | None = None
    t_end: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    estimated: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.t_first is not None

    @property
    def ttft(self) -> float | None:
        return self.t_first - self.t_send if self.t_first is not None else None


def make_client(base_url: str, timeout_s: float) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=base_url + "/v1", api_key="bench", timeout=timeout_s, max_retries=0)


async def one_request(
    client: AsyncOpenAI,
    model: str,
    messages: Messages,
    max_tokens: int,
    extra: dict[str, Any],
    count_tokens: Callable[[str], int],
) -> ReqResult:
    res = ReqResult(time.perf_counter())
    parts: list[str] = []
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
            **extra,
        )
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                res.completion_tokens = chunk.usage.completion_tokens
                res.prompt_tokens = chunk.usage.prompt_tokens
            for choice in chunk.choices or []:
                text = choice.delta.content if choice.delta is not None else None
                if text:
                    if res.t_first is None:
                        res.t_first = now
                    res.chunk_times.append(now)
                    parts.append(text)
        res.t_end = time.perf_counter()
    except asyncio.CancelledError:
        res.error = "cancelled at the level's time limit"
        raise
    except Exception as exc:  # a failing server is reported, never fatal
        res.error = f"{type(exc).__name__}: {str(exc)[:200]}"
        return res
    text = "".join(parts)
    if text.lstrip().startswith("ERROR:"):  # mlx-router 2.3.1 reports failures as content
        res.error = text.strip()[:200]
    elif res.t_first is None:
        res.error = "no content received"
    if not res.completion_tokens and text:
        res.completion_tokens, res.estimated = count_tokens(text), True
    return res


async def run_requests(
    client: AsyncOpenAI,
    model: str,
    prompts: list[Messages],
    max_tokens: int,
    concurrency: int,
    extra: dict[str, Any],
    count_tokens: Callable[[str], int],
    timeout_s: float,
) -> tuple[list[ReqResult], float, bool]:
    """(results, wall seconds, timed out). Requests still running at the time limit are cancelled."""
    results: list[ReqResult] = []
    pending = list(range(len(prompts)))[::-1]

    async def worker() -> None:
        while pending:
            i = pending.pop()
            results.append(await one_request(client, model, prompts[i], max_tokens, extra, count_tokens))

    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(worker()) for _ in range(min(concurrency, len(prompts)))]
    done, running = await asyncio.wait(tasks, timeout=timeout_s)
    timed_out = bool(running)
    for t in running:
        t.cancel()
    if running:
        await asyncio.gather(*running, return_exceptions=True)
    for t in done:
        if t.exception() is not None:
            results.append(ReqResult(t0, error=repr(t.exception())))
    wall = time.perf_counter() - t0
    return results, wall, timed_out


def summarize(results: list[ReqResult], wall: float, requested: int, timed_out: bool) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    gaps = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False)]
    tpots = [
        (r.chunk_times[-1] - r.chunk_times[0]) / (r.completion_tokens - 1)
        for r in ok
        if r.completion_tokens and r.completion_tokens > 1 and len(r.chunk_times) > 1
    ]
    # Time from the first to the last chunk over TTFT: near 0 means the text arrived in one burst, not streamed.
    spreads = [(r.chunk_times[-1] - r.chunk_times[0]) / r.ttft for r in ok if r.ttft]
    tokens = sum(r.completion_tokens or 0 for r in ok)
    errors = sorted({r.error for r in results if r.error})
    return {
        "requested": requested,
        "ok": len(ok),
        "failed": requested - len(ok),
        "timed_out": timed_out,
        "errors": errors[:5],
        "wall_s": wall,
        "ttft_p50_s": median(ttfts),
        "ttft_p95_s": percentile(ttfts, 95),
        "itl_p50_s": median(gaps),
        "tpot_p50_s": median(tpots),
        "chunks_per_request": median([float(len(r.chunk_times)) for r in ok]),
        "stream_spread": median(spreads),
        "completion_tokens": tokens,
        "completion_tokens_p50": median([float(r.completion_tokens or 0) for r in ok]),
        "prompt_tokens_p50": median([float(r.prompt_tokens) for r in ok if r.prompt_tokens]),
        "tokens_estimated": any(r.estimated for r in ok),
        "aggregate_tok_s": tokens / wall if wall > 0 else None,
    }


async def sequential(
    client: AsyncOpenAI,
    calls: list[tuple[str, Messages]],
    max_tokens: int,
    extra: dict[str, Any],
    count_tokens: Callable[[str], int],
    timeout_s: float,
) -> list[ReqResult]:
    """One request after another (prefix-cache and swap probes); stops at the first failure or the time limit."""
    out: list[ReqResult] = []
    deadline = time.monotonic() + timeout_s
    for model, messages in calls:
        left = deadline - time.monotonic()
        if left <= 0:
            out.append(ReqResult(time.perf_counter(), error="time limit reached"))
            break
        try:
            r = await asyncio.wait_for(one_request(client, model, messages, max_tokens, extra, count_tokens), left)
        except TimeoutError:
            r = ReqResult(time.perf_counter(), error=f"no answer within {timeout_s:.0f}s")
        out.append(r)
        if not r.ok:
            break
    return out
