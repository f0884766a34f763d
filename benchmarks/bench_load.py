"""One server's whole run: warm-up, the load levels (closed loops of `concurrency` workers, bench_clients.py), then the
shared-prefix, single-stream and swap probes.

Every step is time-bounded; a level that hits its limit restarts the server and skips the higher concurrencies of that
prompt length. Failures become the result's `status`/`reason` or a level's errors, never exceptions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_clients import ClientPool, Messages, one_request
from bench_common import Plan, ReqResult, median, median_pass, summarize
from bench_servers import MAIN, ServerProcess, ServerSpec, free_port, make_spec
from openai import AsyncOpenAI

PairedPass = Callable[[int, int], None]  # runs the raw engine's pass k of level i (bench.RawPartner.run_pass)
TokenCounter = Callable[[str], int]  # the model's tokenizer: tokens in an answer's text


async def sequential(
    client: AsyncOpenAI, calls: list[tuple[str, Messages]], max_tokens: int, temp: float, timeout_s: float
) -> list[ReqResult]:
    """One request after another (probes); stops at the first failure or at the time limit."""
    out: list[ReqResult] = []
    deadline = time.monotonic() + timeout_s
    for model, messages in calls:
        try:
            left = max(0.001, deadline - time.monotonic())
            r = await asyncio.wait_for(one_request(client, model, messages, max_tokens, temp), left)
        except TimeoutError:
            r = ReqResult(time.perf_counter(), error=f"time limit ({timeout_s:.0f}s)")
        out.append(r)
        if not r.ok:
            break
    return out


def _errors(rs: list[ReqResult]) -> list[str]:
    return sorted({r.error for r in rs if r.error})


class Suite:
    """One server through the plan: warm-up, load levels, prefix probe, single-stream model, swap probe. The same
    clients serve them all (the levels' spread over `plan.client_procs` processes), so connection set-up and the SDK's
    first-use costs fall in the warm-up."""

    def __init__(
        self,
        spec: ServerSpec,
        proc: ServerProcess,
        wl: dict[str, Any],
        plan: Plan,
        count: TokenCounter,
        pair: PairedPass | None = None,
    ) -> None:
        self.spec, self.proc, self.wl, self.plan, self.count, self.pair = spec, proc, wl, plan, count, pair
        self.main = spec.names[MAIN]
        self.notes: list[str] = []
        timeout = max(plan.level_timeout_s, plan.startup_timeout_s)
        self.clients = ClientPool(plan.client_procs, proc.base_url, timeout)

    async def run(self, result: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        try:
            why = self.proc.wait_ready(self.plan.startup_timeout_s) or await self.warm_up()
            result["ready_s"] = time.perf_counter() - t0
            if why:
                result.update(status="failed", reason=why)
                return
            result["levels"] = await self.levels()
            result.update(await self.probes())
        finally:
            await self.clients.close()

    async def warm_up(self) -> str | None:
        """Load the model with a long prompt, then short bursts (GPU: at each concurrency); None when all succeeded."""
        plan, wl = self.plan, self.wl
        first = await sequential(
            self.clients.local, [(self.main, wl["warm_long"][0])], 8, plan.temperature, plan.startup_timeout_s
        )
        if not first[0].ok:
            return f"warm-up request failed: {first[0].error}"
        for c in self._warm_concurrencies():
            burst = [m for m, _ in wl["warm_short"][:c]]
            rs, _, timed_out = await self.clients.closed_loop(
                self.main, burst, c, 8, plan.temperature, plan.startup_timeout_s
            )
            ok = sum(1 for r in rs if r.ok)
            if timed_out or not ok:
                return f"warm-up burst of {c} failed: {_errors(rs) or 'time limit'}"
            if ok < c:  # e.g. connections refused past a small listen backlog: the levels will count those
                self.notes.append(f"warm-up burst of {c}: {c - ok} of {c} failed ({', '.join(_errors(rs))})")
        return None

    def _warm_concurrencies(self) -> list[int]:
        cs = [c for c in self.plan.concurrencies if c > 1] if self.plan.warm_every_concurrency else [8]
        return [c for c in cs if not self.spec.serial or c <= self.plan.serial_max_concurrency]

    async def levels(self) -> list[dict[str, Any]]:
        plan, out = self.plan, []
        stopped: set[int] = set()  # prompt lengths whose higher concurrencies are skipped
        for i, (lv, prompts) in enumerate(zip(plan.levels, self.wl["levels"], strict=True)):
            if lv.prompt_tokens in stopped:
                continue
            if self.spec.serial and lv.concurrency > plan.serial_max_concurrency:
                self.notes.append(
                    f"{lv.prompt_tokens}x{lv.concurrency} not run: no batching, the plan "
                    f"stops such servers at concurrency {plan.serial_max_concurrency}"
                )
                continue
            passes, timed_out = [], False
            for k in range(plan.passes):
                batch = prompts[k * lv.requests : (k + 1) * lv.requests]
                if self.pair and k % 2 == 0:  # paired passes alternate which side goes first
                    await asyncio.to_thread(self.pair, i, k)
                rs, wall, timed_out = await self.clients.closed_loop(
                    self.main,
                    [m for m, _ in batch],
                    lv.concurrency,
                    plan.output_tokens,
                    plan.temperature,
                    plan.level_timeout_s,
                )
                passes.append(summarize(rs, wall, lv.requests, plan.output_tokens, self.count))
                if self.pair and k % 2 == 1:
                    await asyncio.to_thread(self.pair, i, k)
                p = passes[-1]
                print(
                    f"  {self.spec.key} {lv.prompt_tokens}x{lv.concurrency} (pass {k + 1}/{plan.passes}): "
                    f"{p['ok']}/{lv.requests} ok, TTFT p50 {p['ttft_p50_s'] or 0:.3f}s, "
                    f"{p['aggregate_tok_s'] or 0:.1f} tok/s, {wall:.1f}s",
                    flush=True,
                )
                if timed_out or not self.proc.alive():
                    break
            s = {
                "prompt_tokens": lv.prompt_tokens,
                "concurrency": lv.concurrency,
                "timed_out": timed_out,
                **median_pass(passes),
            }
            out.append(s)
            if timed_out or not self.proc.alive():
                stopped.add(lv.prompt_tokens)
                why = "its time limit" if timed_out else "the server exited"
                self.notes.append(
                    f"{lv.prompt_tokens}-token levels stopped at concurrency {lv.concurrency} ({why}, "
                    f"{plan.level_timeout_s:.0f}s); the server was restarted"
                )
                await self.clients.reconnect()  # its connections went with the old process
                failed = self.proc.restart(plan.startup_timeout_s) or await self.warm_up()
                if failed:
                    self.notes.append(f"restart failed: {failed}")
                    break
        return out

    async def probes(self) -> dict[str, Any]:
        plan, wl, t, client = self.plan, self.wl, self.plan.temperature, self.clients.local
        res: dict[str, Any] = {}
        rs = await sequential(
            client, [(self.main, m) for m, _ in wl["prefix"]], plan.probe_tokens, t, plan.level_timeout_s
        )
        warm = [x for r in rs[1:] if (x := r.ttft) is not None]
        res["prefix"] = {
            "cold_ttft_s": rs[0].ttft,
            "warm_ttft_s": median(warm),
            "warm_runs": warm,
            "errors": _errors(rs),
        }
        swap_a = wl["single_name"] or MAIN
        if wl["single_name"]:  # one unmeasured request loads it (a swap), then single streams
            name = self.spec.names[swap_a]
            calls = [(name, m) for m, _ in [wl["warm_short"][0], *wl["single"]]]
            rs = await sequential(client, calls, plan.output_tokens, t, plan.level_timeout_s)
            wall = sum(r.t_end - r.t_send for r in rs[1:] if r.t_end)
            res["single"] = summarize(rs[1:], wall, len(calls) - 1, plan.output_tokens)
        # Swap: two requests with A resident, then B, A, B...: each of those loads its model first.
        a, b = self.spec.names[swap_a], self.spec.names[swap_a + "-b"]
        models = [a, a] + [b if i % 2 == 0 else a for i in range(plan.swap_rounds)]
        calls = list(zip(models, [m for m, _ in wl["swap"]], strict=False))
        rs = await sequential(client, calls, plan.probe_tokens, t, plan.startup_timeout_s * plan.swap_rounds)
        ttft = [r.ttft if r.ok else None for r in rs]
        swaps = [x for x in ttft[2:] if x is not None]
        res["swap"] = {
            "resident_ttft_s": median([x for x in ttft[:2] if x is not None]),
            "swap_ttft_s": median(swaps),
            "swap_runs": swaps,
            "errors": _errors(rs),
        }
        return res


def bench_server(
    key: str,
    model_dir: Path,
    work: Path,
    wl: dict[str, Any],
    plan: Plan,
    logs: Path,
    peer_site: Path,
    count: TokenCounter,
    pair: PairedPass | None = None,
) -> dict[str, Any]:
    """Start one server, run the suite on it, stop it; the result is a row of the report, whatever happens. `pair`,
    when given, runs the raw engine's pass of the same level and number next to each of this server's passes."""
    port = free_port()
    spec = make_spec(key, model_dir, work, port, plan.level_timeout_s * 2, plan.temperature, peer_site)
    result: dict[str, Any] = {"label": spec.label, "status": "ok", "flags": spec.flags, "command": " ".join(spec.argv)}
    proc = ServerProcess(spec, port, logs / f"server-{key}.log")
    print(f"{spec.label}: starting on port {port} ...", flush=True)
    proc.start()
    suite = Suite(spec, proc, wl, plan, count, pair)
    try:
        asyncio.run(suite.run(result))
    except Exception as exc:  # a broken peer is a row in the table, not the end of the run
        result.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
    finally:
        proc.stop()
    log = proc.log.read_text(errors="replace")
    suite.notes += [f"its log says {a!r}: figures credited max_tokens are too high" for a in spec.alarms if a in log]
    result["notes"] = suite.notes
    return result
