"""One command: this server against its peers and the raw mlx-lm ceiling, on the same model and load, in one run.

    python benchmarks/bench.py --size cpu|gpu [--tiny] [--out DIR] [--models DIR] [--peer-site DIR]
                               [--only raw,mlx_router,mlx_lm,mlx_router_231] [--merge]

Builds (or reuses) random-weight models with helper_tools/tiny_models.py, measures the raw engine in a child process,
then starts each server in turn on a free loopback port, warms it up, runs the load levels and the prefix, single-
stream and swap probes, and stops it. Writes `results-<size>.json` and `.md` to --out (logs under --out/logs) and
prints the markdown last. mlx-router 2.3.1 runs from --peer-site (a `pip install --target` folder, see
bench_servers.PEER_INSTALL); without it its rows say why it was skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (
    BENCH_DIR,
    OFFLINE_ENV,
    Plan,
    PromptFactory,
    die_with_parent,
    gpu_memory_gb,
    hardware_info,
    make_plan,
)
from bench_load import bench_server
from bench_report import render
from bench_servers import MAIN, check_peer

PARTS = ("raw", "mlx_router", "mlx_lm", "mlx_router_231")
# Prompt seeds, far apart: two prompts from one seed share their first words, and a prefix cache would serve one
# from the other's KV cache.
SEED_LEVEL, SEED_WARM, SEED_PREFIX, SEED_SWAP, SEED_SINGLE = 10**6, 10**9, 2 * 10**9, 3 * 10**9, 4 * 10**9


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["cpu", "gpu"], required=True)
    p.add_argument("--tiny", action="store_true", help="a tiny model and few levels: checks the code path of a size")
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument(
        "--models",
        type=Path,
        default=Path(tempfile.gettempdir()) / "mlx-bench-models",
        help="where built models are kept and reused (default: %(default)s)",
    )
    p.add_argument(
        "--peer-site",
        type=Path,
        default=BENCH_DIR / ".peer-site",
        help="folder holding mlx-router 2.3.1 (pip install --target); default: %(default)s",
    )
    p.add_argument("--only", default=",".join(PARTS), help="comma list of parts to run (default: all)")
    p.add_argument(
        "--passes", type=int, default=1, help="run each level N times with new prompts and report the median pass"
    )
    p.add_argument("--merge", action="store_true", help="keep the other parts of an earlier results JSON in --out")
    return p.parse_args(argv)


def run_child(cmd: list[str], log: Path, timeout_s: float) -> str | None:
    """Run a bench_engine.py step; None on success, else why not (its output is in `log`)."""
    with log.open("a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        try:
            rc = subprocess.run(
                cmd,
                stdout=fh,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
                preexec_fn=die_with_parent,
                env={**os.environ, **OFFLINE_ENV},
            ).returncode
        except subprocess.TimeoutExpired:
            return f"stopped at its {timeout_s:.0f}s limit (see {log.name})"
    return f"exited with status {rc} (see {log.name})" if rc else None


def link_models(built: dict[str, Any], model_dir: Path) -> None:
    """Served folders of per-file symlinks: `bench` (levels), and the swap pair (`bench-q4`, `bench-q4-b` on a GPU,
    else `bench-b` beside `bench`). Copies of one model: loading either reads the same page-cached files."""
    folders = {MAIN: built["main"]}
    if built["single"]:
        folders.update({"bench-q4": built["single"], "bench-q4-b": built["single"]})
    else:
        folders["bench-b"] = built["main"]
    for name, src in folders.items():
        (model_dir / name).mkdir(parents=True)
        for f in Path(src).iterdir():
            if f.is_file() and not f.name.startswith("."):
                (model_dir / name / f.name).symlink_to(f.resolve())


def describe(folder: Path) -> dict[str, Any]:
    """Shape, dtype and weight size of a model folder, from its files."""
    cfg = json.loads((folder / "config.json").read_text())
    keys = (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "vocab_size",
        "tie_word_embeddings",
    )
    return {
        **{k: cfg.get(k) for k in keys},
        "dtype": cfg.get("torch_dtype"),
        "quantization": cfg.get("quantization"),
        "weight_gb": round(sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e9, 3),
    }


def fit_memory(plan: Plan, model: dict[str, Any], notes: list[str]) -> Plan:
    """Drop levels whose KV cache (twice: batching copies it) plus weights would pass 80% of the GPU's memory:
    MLX's CUDA backend uses managed memory, and oversubscribing it can hang the GPU instead of failing."""
    total = gpu_memory_gb()
    if total is None:
        return plan
    head_dim = model["hidden_size"] // model["num_attention_heads"]
    width = 4 if model["dtype"] == "float32" else 2
    per_token = model["num_hidden_layers"] * model["num_key_value_heads"] * head_dim * 2 * width / 1e9
    keep = []
    for lv in plan.levels:
        need = model["weight_gb"] + 4 + 2 * lv.concurrency * (lv.prompt_tokens + plan.output_tokens) * per_token
        if need <= 0.8 * total:
            keep.append(lv)
        else:
            notes.append(
                f"{lv.prompt_tokens}x{lv.concurrency} not run: ~{need:.0f} GB (weights, 2x KV cache, 4 GB) "
                f"> 80% of the GPU's {total:.0f} GB"
            )
    return dataclasses.replace(plan, levels=tuple(keep))


def workload(plan: Plan, model: str, single_name: str | None) -> dict[str, Any]:
    """The prompts, each as (chat messages, token ids): the servers get the first, the raw engine the second."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    f = PromptFactory(load_tokenizer(Path(model)))
    n_warm = max([8, *plan.concurrencies])
    return {
        "levels": [
            [f.chat(lv.prompt_tokens, SEED_LEVEL * (i + 1) + j) for j in range(lv.requests * plan.passes)]
            for i, lv in enumerate(plan.levels)
        ],
        "warm_long": f.chat(max(plan.prompt_lengths), SEED_WARM),
        "warm_short": [f.chat(128, SEED_WARM + 1 + j) for j in range(n_warm)],
        "prefix": f.shared_prefix(plan.prefix_tokens, plan.question_tokens, SEED_PREFIX, 1 + plan.warm_repeats),
        "single": [f.chat(128, SEED_SINGLE + j) for j in range(plan.single_requests)] if single_name else [],
        "swap": [f.chat(128, SEED_SWAP + j) for j in range(2 + plan.swap_rounds)],
        "single_name": single_name,
    }


def run_raw(plan: Plan, wl: dict[str, Any], model_dir: Path, work: Path, log: Path) -> dict[str, Any]:
    ids = lambda ps: [p[1] for p in ps]  # noqa: E731
    raw_wl = {
        "main": str(model_dir / MAIN),
        "single_model": str(model_dir / wl["single_name"]) if wl["single_name"] else None,
        "swap_b": str(model_dir / f"{wl['single_name'] or MAIN}-b"),
        "temperature": plan.temperature,
        "output_tokens": plan.output_tokens,
        "passes": plan.passes,
        "warm_long": wl["warm_long"][1],
        "warm_short": ids(wl["warm_short"]),
        "warm_concurrencies": [c for c in plan.concurrencies if c > 1] if plan.warm_every_concurrency else [8],
        "levels": [
            {"prompt_tokens": lv.prompt_tokens, "concurrency": lv.concurrency, "prompts": ids(ps)}
            for lv, ps in zip(plan.levels, wl["levels"], strict=True)
        ],
        "prefix": ids(wl["prefix"]),
        "single": ids(wl["single"]),
        "swap_prompt": wl["swap"][0][1],
    }
    (work / "raw-workload.json").write_text(json.dumps(raw_wl))
    out = work / "raw-result.json"
    print("raw engine ceiling ...", flush=True)
    cmd = [sys.executable, str(BENCH_DIR / "bench_engine.py"), "raw", str(work / "raw-workload.json"), str(out)]
    error = run_child(cmd, log, plan.raw_timeout_s)
    res: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    return {**res, "error": error} if error else res


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the `finally` blocks that stop the servers


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    args = parse_args(argv)
    parts = [p for p in args.only.split(",") if p]
    if unknown := set(parts) - set(PARTS):
        raise SystemExit(f"unknown part(s) {sorted(unknown)}; known: {', '.join(PARTS)}")
    plan = dataclasses.replace(make_plan(args.size, args.tiny), passes=max(1, args.passes))
    out, models = args.out.resolve(), args.models.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    models.mkdir(parents=True, exist_ok=True)
    name = f"results-{args.size}{'-tiny' if args.tiny else ''}"
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/bench.py", *(argv or sys.argv[1:])])
    work = Path(tempfile.mkdtemp(prefix="mlx-bench-"))
    try:
        return _run(args, plan, parts, out, models, name, command, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(
    args: argparse.Namespace, plan: Plan, parts: list[str], out: Path, models: Path, name: str, command: str, work: Path
) -> int:
    log = out / "logs" / "bench.log"
    print(f"building models in {models} (log: {log}) ...", flush=True)
    cmd = [
        sys.executable,
        str(BENCH_DIR / "bench_engine.py"),
        "build",
        args.size,
        str(int(args.tiny)),
        str(models),
        str(work / "built.json"),
    ]
    if error := run_child(cmd, log, 3600):
        raise SystemExit(f"model build failed: {error}")
    built = json.loads((work / "built.json").read_text())
    model_dir = work / "models"
    link_models(built, model_dir)
    info = {"main": describe(Path(built["main"])), "single": built["single"] and describe(Path(built["single"]))}
    notes: list[str] = []
    plan = fit_memory(plan, info["main"], notes)
    wl = workload(plan, built["main"], "bench-q4" if built["single"] else None)
    json_path = out / f"{name}.json"
    res: dict[str, Any] = {"raw": {}, "servers": {}}
    merged: list[str] = []
    if args.merge and json_path.exists():
        old = json.loads(json_path.read_text())
        res.update(raw=old["raw"], servers=old["servers"])
        merged = [*old["meta"]["merged"], old["meta"]["command"]]
    res["meta"] = {
        "merged": merged,
        "command": command,
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "size": args.size,
        "tiny": args.tiny,
        "hardware": hardware_info(),
        "model": info,
        "plan": dataclasses.asdict(plan),
    }
    res["notes"] = notes

    def save() -> str:  # after every part: a run cut short still leaves its figures so far
        res["servers"] = {k: res["servers"][k] for k in PARTS[1:] if k in res["servers"]}
        json_path.write_text(json.dumps(res, indent=1))
        md = render(res)
        (out / f"{name}.md").write_text(md)
        return md

    now = lambda: dt.datetime.now().isoformat(timespec="seconds")  # noqa: E731
    if "raw" in parts:
        start = now()
        res["raw"] = {**run_raw(plan, wl, model_dir, work, log), "ran": [start, now()]}
        save()
    for key in (p for p in PARTS[1:] if p in parts):
        start = now()
        why = check_peer(args.peer_site) if key == "mlx_router_231" else None
        res["servers"][key] = (
            {"status": "skipped", "reason": why}
            if why
            else bench_server(key, model_dir, work, wl, plan, out / "logs", args.peer_site)
        )
        res["servers"][key]["ran"] = [start, now()]
        save()
    md = save()
    print(f"\nwrote {out / (name + '.md')} and {json_path}\n", flush=True)
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
