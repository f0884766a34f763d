"""One command: this server against its peers and the raw mlx-lm ceiling, same model, same load, one run.

    python benchmarks/run_bench.py --size cpu|gpu [--model-path PATH] [--out DIR]
                                   [--peers mlx_lm,mlx_router_231] [--quick]

Steps: build (or reuse) the model; measure the raw engine in a child process; then start each server as a child
process on a free loopback port, warm it up, run the load levels, the shared-prefix probe and the swap probe, and
stop it. Every step is time-bounded; a failing or missing peer is reported in the table, never fatal. Writes
``results-<size>.md`` and ``results-<size>.json`` to --out and prints the markdown last.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import BENCH_DIR, ROOT, Plan, PromptFactory, hardware_info, make_plan, median, plan_dict
from bench_load import ReqResult, make_client, run_requests, sequential, summarize
from bench_models import describe
from bench_report import render
from bench_servers import LABELS, ServerProcess, ServerSpec, ensure_peer, free_port, make_spec

PEERS = ("mlx_lm", "mlx_router_231")
Counter = Callable[[str], int]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["cpu", "gpu"], required=True)
    p.add_argument("--model-path", type=Path, default=None, help="serve this MLX model folder instead of building one")
    p.add_argument("--out", type=Path, default=ROOT / "bench-out")
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma list of {', '.join(PEERS)} (or 'none')")
    p.add_argument("--quick", action="store_true", help="tiny levels: a few minutes on a 2-core CPU")
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="sampling temperature for every server and the raw run (default 1.0; 0 = greedy)",
    )
    p.add_argument("--quantize", type=int, choices=[4], default=None, help="gpu: also build and serve a 4-bit copy")
    p.add_argument("--skip", default="", help="comma list of parts to leave out: raw, mlx_router, or a peer")
    p.add_argument("--merge", action="store_true", help="update an existing results JSON with the parts run now")
    p.add_argument("--no-install", action="store_true", help="never create benchmarks/.venv-peer")
    return p.parse_args(argv)


def prepare_model(args: argparse.Namespace, work: Path, log: Path) -> Path:
    if args.model_path:
        return args.model_path.resolve()
    dest = (args.out / "models" / "llama31-8b-shape") if args.size == "gpu" else work / "src-model"
    marker = work / "model-path.txt"
    cmd = [
        sys.executable,
        str(BENCH_DIR / "bench_models.py"),
        "--size",
        args.size,
        "--dest",
        str(dest),
        "--print-path",
        str(marker),
    ] + (["--quantize", str(args.quantize)] if args.quantize else [])
    with log.open("a") as fh:
        subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=True, timeout=3600)
    return Path(marker.read_text().strip())


def link_models(src: Path, model_dir: Path) -> None:
    """`bench` and `bench-b`: real folders of per-file symlinks to `src`, so every server finds two models."""
    for name in ("bench", "bench-b"):
        folder = model_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.is_file():
                (folder / f.name).symlink_to(f.resolve())


def build_workload(plan: Plan, model: Path) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """(chat prompts for the servers, token-id prompts for the raw run, factory). Same seeds, same prompts."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    f = PromptFactory(load_tokenizer(model))
    lengths = plan.prompt_lengths
    levels = [
        [f.chat(lv.prompt_tokens, 1_000_000 * (i + 1) + j) for j in range(lv.requests)]
        for i, lv in enumerate(plan.levels)
    ]
    warm_long = f.chat(max(lengths), 11)
    warm_burst = [f.chat(min(lengths), 20 + j) for j in range(8)]
    prefix = f.shared_prefix(plan.prefix_tokens, plan.question_tokens, 777, 1 + plan.warm_repeats)
    swap = [f.chat(128, 5_000_000 + j) for j in range(2 + plan.swap_rounds)]
    single = [
        [f.chat(length, 9_000_000 + 1000 * length + j)[1] for j in range(plan.raw_single_repeats)] for length in lengths
    ]
    seen: set[tuple[int, int]] = set()
    batches = []
    for lv, prompts in zip(plan.levels, levels, strict=True):
        if (lv.prompt_tokens, lv.concurrency) not in seen:
            seen.add((lv.prompt_tokens, lv.concurrency))
            batches.append([ids for _, ids in prompts[: lv.concurrency]])
    server_wl = {
        "levels": [[m for m, _ in lv] for lv in levels],
        "warm_long": warm_long[0],
        "warm_burst": [m for m, _ in warm_burst],
        "prefix": [m for m, _ in prefix],
        "swap": [m for m, _ in swap],
    }
    raw_wl = {
        "output_tokens": plan.output_tokens,
        "temperature": plan.temperature,
        "repeat_below_tokens": plan.raw_repeat_below_tokens,
        "warmup_single": [warm_burst[0][1], warm_long[1]],
        "warmup_batch": [ids for _, ids in warm_burst],
        "single": single,
        "batch": batches,
        "prefix": [ids for _, ids in prefix],
        "swap_prompt": swap[0][1],
    }
    return server_wl, raw_wl, f


def run_raw(plan: Plan, raw_wl: dict[str, Any], work: Path, log: Path) -> dict[str, Any]:
    wl_path, out_path = work / "raw-workload.json", work / "raw-result.json"
    wl_path.write_text(json.dumps(raw_wl))
    cmd = [sys.executable, str(BENCH_DIR / "bench_raw.py"), str(wl_path), str(out_path)]
    print("raw engine ceiling ...", flush=True)
    error = None
    with log.open("a") as fh:
        try:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=plan.raw_timeout_s).returncode
            error = f"bench_raw.py exited with status {rc} (see raw.log)" if rc else None
        except subprocess.TimeoutExpired:
            error = f"raw run stopped at its {plan.raw_timeout_s:.0f}s limit"
    result: dict[str, Any] = json.loads(out_path.read_text()) if out_path.exists() else {}
    if error:
        result["error"] = error
    return result


def _ttfts(rs: list[ReqResult]) -> list[float]:
    return [r.ttft for r in rs if r.ok and r.ttft is not None]


def _errs(rs: list[ReqResult]) -> list[str]:
    return sorted({r.error for r in rs if r.error})


async def warm_up(spec: ServerSpec, proc: ServerProcess, wl: dict[str, Any], plan: Plan, count: Counter) -> str | None:
    """Load the model with one request (long prompt), then a burst of short ones; None when all succeeded."""
    async with make_client(proc.base_url, plan.warmup_timeout_s) as client:
        first = await sequential(
            client, [(spec.model_a, wl["warm_long"])], 8, spec.request_extra, count, plan.warmup_timeout_s
        )
        if not first[0].ok:
            return f"warm-up request failed: {first[0].error}"
        burst = wl["warm_burst"][: min(8, plan.max_concurrency)]
        rs, _, timed_out = await run_requests(
            client, spec.model_a, burst, 8, len(burst), spec.request_extra, count, plan.warmup_timeout_s
        )
        bad = [r for r in rs if not r.ok]
        return f"warm-up burst failed: {_errs(rs) or 'time limit'}" if timed_out or bad else None


async def run_suite(
    spec: ServerSpec, proc: ServerProcess, wl: dict[str, Any], plan: Plan, count: Counter, result: dict[str, Any]
) -> None:
    timeout = plan.level_timeout_s
    skip_from: dict[int, int] = {}  # prompt length -> concurrency at which it timed out
    result["levels"] = []
    for lv, prompts in zip(plan.levels, wl["levels"], strict=True):
        if lv.prompt_tokens in skip_from:
            continue
        async with make_client(proc.base_url, timeout) as client:
            rs, wall, timed_out = await run_requests(
                client, spec.model_a, prompts, plan.output_tokens, lv.concurrency, spec.request_extra, count, timeout
            )
        summary = {
            "prompt_tokens": lv.prompt_tokens,
            "concurrency": lv.concurrency,
            **summarize(rs, wall, lv.requests, timed_out),
        }
        result["levels"].append(summary)
        print(
            f"  {spec.key} L={lv.prompt_tokens} c={lv.concurrency}: {summary['ok']}/{lv.requests} ok, "
            f"ttft p50 {summary['ttft_p50_s'] or 0:.3f}s, agg {summary['aggregate_tok_s'] or 0:.1f} tok/s, "
            f"wall {wall:.1f}s",
            flush=True,
        )
        if timed_out or not proc.alive():
            skip_from[lv.prompt_tokens] = lv.concurrency
            result.setdefault("notes", []).append(
                f"{lv.prompt_tokens}-token levels stopped at concurrency {lv.concurrency} (level time limit "
                f"{timeout:.0f}s{'' if proc.alive() else '; server exited'}); the server was restarted"
            )
            proc.stop()
            proc.start()
            why = proc.wait_ready(plan.startup_timeout_s) or await warm_up(spec, proc, wl, plan, count)
            if why:
                result["notes"].append(f"restart failed: {why}")
                return
    async with make_client(proc.base_url, timeout) as client:
        calls = [(spec.model_a, m) for m in wl["prefix"]]
        rs = await sequential(client, calls, plan.probe_tokens, spec.request_extra, count, timeout)
        t = _ttfts(rs)
        result["prefix"] = {
            "cold_ttft_s": t[0] if t else None,
            "warm_ttft_s": median(t[1:]),
            "warm_runs": t[1:],
            "errors": _errs(rs),
        }
        # Swap: two requests with A resident, then alternate B, A, B, ... (cache_size 1 / single-model servers).
        models = [spec.model_a, spec.model_a] + [
            spec.model_b if i % 2 == 0 else spec.model_a for i in range(plan.swap_rounds)
        ]
        calls = list(zip(models, wl["swap"], strict=False))
        rs = await sequential(client, calls, plan.probe_tokens, spec.request_extra, count, plan.warmup_timeout_s)
        t = [r.ttft if r.ok else None for r in rs]
        swaps = [x for x in t[2:] if x is not None]
        result["swap"] = {
            "resident_ttft_s": t[1] if len(t) > 1 else None,
            "swap_ttft_s": median(swaps),
            "swap_runs": swaps,
            "errors": _errs(rs),
        }


def bench_server(
    key: str,
    args: argparse.Namespace,
    model_dir: Path,
    work: Path,
    wl: dict[str, Any],
    plan: Plan,
    count: Counter,
    logs: Path,
) -> dict[str, Any]:
    label = LABELS[key]
    result: dict[str, Any] = {"label": label, "status": "ok"}
    if key == "mlx_router_231":
        ok, how = ensure_peer(args.size, not args.no_install, logs / "peer-install.log")
        result["installed"] = how
        if not ok:
            return {**result, "status": "skipped", "reason": how}
    port = free_port()
    spec = make_spec(key, model_dir, work, port, plan.level_timeout_s * 2, plan.temperature)
    result.update(flags=spec.flags, notes=list(spec.notes), command=" ".join(spec.argv))
    proc = ServerProcess(spec, port, logs / f"{key}.log")
    print(f"{label}: starting on port {port} ...", flush=True)
    t0 = time.perf_counter()
    proc.start()
    try:
        why = proc.wait_ready(plan.startup_timeout_s)
        result["startup_s"] = time.perf_counter() - t0
        if why is None:
            t1 = time.perf_counter()
            why = asyncio.run(warm_up(spec, proc, wl, plan, count))
            result["warmup_s"] = time.perf_counter() - t1
        if why:
            return {**result, "status": "failed", "reason": why}
        asyncio.run(run_suite(spec, proc, wl, plan, count, result))
    except Exception as exc:  # a broken peer is a row in the table, not the end of the run
        result.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
    finally:
        proc.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args.size, args.quick)
    if args.temperature is not None:
        plan = dataclasses.replace(plan, temperature=args.temperature)
    skip = {s for s in args.skip.split(",") if s}
    peers = [p for p in args.peers.split(",") if p and p != "none"]
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise SystemExit(f"unknown peer(s) {unknown}; known: {', '.join(PEERS)}")
    args.out = args.out.resolve()
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    name = f"results-{args.size}" + (f"-q{args.quantize}" if args.quantize and not args.model_path else "")
    command = "python " + " ".join(shlex.quote(a) for a in ([sys.argv[0]] + (argv or sys.argv[1:])))
    work = Path(tempfile.mkdtemp(prefix="mlx-bench-"))
    print(f"work dir {work}; logs in {logs}", flush=True)
    try:
        return _run(args, plan, skip, peers, logs, name, command, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(
    args: argparse.Namespace,
    plan: Plan,
    skip: set[str],
    peers: list[str],
    logs: Path,
    name: str,
    command: str,
    work: Path,
) -> int:
    model = prepare_model(args, work, logs / "build.log")
    model_dir = work / "models"
    link_models(model, model_dir)
    server_wl, raw_wl, factory = build_workload(plan, model)
    raw_wl.update(model_a=str(model_dir / "bench"), model_b=str(model_dir / "bench-b"))
    res: dict[str, Any] = {
        "meta": {
            "command": command,
            "date": dt.datetime.now().isoformat(timespec="seconds"),
            "size": args.size,
            "quick": args.quick,
            "hardware": hardware_info(),
            "model": describe(model),
            "plan": plan_dict(plan),
        },
        "servers": {},
        "notes": [],
    }
    json_path = args.out / f"{name}.json"
    if args.merge and json_path.exists():
        old = json.loads(json_path.read_text())
        res["raw"], res["servers"] = old.get("raw", {}), old.get("servers", {})
        res["meta"]["merged"] = [*old["meta"].get("merged", []), old["meta"]["command"]]
    if "raw" not in skip:
        res["raw"] = run_raw(plan, raw_wl, work, logs / "raw.log")
    count = factory.count_tokens
    for key in ["mlx_router", *peers]:
        if key in skip:
            continue
        res["servers"][key] = bench_server(key, args, model_dir, work, server_wl, plan, count, logs)
        json_path.write_text(json.dumps(res, indent=2))
    order = ["mlx_router", *PEERS]
    res["servers"] = {k: res["servers"][k] for k in order if k in res["servers"]}
    json_path.write_text(json.dumps(res, indent=2))
    md = render(res)
    (args.out / f"{name}.md").write_text(md)
    print(f"\nwrote {args.out / (name + '.md')} and {json_path}\n", flush=True)
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
