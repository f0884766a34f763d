"""One command: this server against its peers and the raw mlx-lm ceiling, on the same model and load, in one run.

    python benchmarks/bench.py --size cpu|gpu [--tiny] [--out DIR] [--models DIR] [--peer-site DIR]
                               [--only raw,mlx_router,mlx_lm,mlx_router_231] [--passes N] [--lengths 128,2048]
                               [--concurrencies 1,8] [--client-procs N] [--merge]

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
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
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
SEED_ENGINE = 5 * 10**9


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
    p.add_argument("--lengths", default="", help="comma list: run only the levels of these prompt lengths")
    p.add_argument("--concurrencies", default="", help="comma list: run only the levels of these concurrencies")
    p.add_argument(
        "--client-procs",
        type=int,
        default=None,
        help="processes the load's clients are spread over (default: 4 for --size gpu, 1 for cpu)",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the other parts and levels of an earlier results JSON in --out (its levels of the lengths run now "
        "are replaced)",
    )
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


def fit_memory(plan: Plan, model: dict[str, Any], notes: list[str], copies: int) -> Plan:
    """Drop levels whose KV cache (twice: batching copies it) plus weights would pass 80% of the GPU's memory: MLX's
    CUDA backend uses managed memory, and oversubscribing it can hang the GPU instead of failing. `copies`: a paired
    raw engine is a second process with its own weights and KV cache, and what one process frees is not reliably
    handed back to the device for the other (CUDA's stream-ordered pool keeps it; seen on an H100)."""
    total = gpu_memory_gb()
    if total is None:
        return plan
    head_dim = model["hidden_size"] // model["num_attention_heads"]
    width = 4 if model["dtype"] == "float32" else 2
    per_token = model["num_hidden_layers"] * model["num_key_value_heads"] * head_dim * 2 * width / 1e9
    keep = []
    for lv in plan.levels:
        kv = 2 * lv.concurrency * (lv.prompt_tokens + plan.output_tokens) * per_token
        need = copies * (model["weight_gb"] + kv) + 4
        if need <= 0.8 * total:
            keep.append(lv)
        else:
            notes.append(
                f"{lv.prompt_tokens}x{lv.concurrency} not run: ~{need:.0f} GB ({copies}x (weights + 2x KV cache), "
                f"4 GB) > 80% of the GPU's {total:.0f} GB"
            )
    return dataclasses.replace(plan, levels=tuple(keep))


def workload(plan: Plan, tokenizer: Any, single_name: str | None) -> dict[str, Any]:
    """The prompts, each as (chat messages, token ids): the servers get the first, the raw engine the second."""
    f = PromptFactory(tokenizer)
    n_warm = max([8, *plan.concurrencies])
    return {
        "levels": [
            # Seeded by the level itself, so a run split with --lengths gives each level the prompts of a whole run.
            [
                f.chat(lv.prompt_tokens, SEED_LEVEL * (lv.prompt_tokens + lv.concurrency) + j)
                for j in range(lv.requests * plan.passes)
            ]
            for lv in plan.levels
        ],
        "warm_long": f.chat(max(plan.prompt_lengths), SEED_WARM),
        "warm_short": [f.chat(128, SEED_WARM + 1 + j) for j in range(n_warm)],
        "prefix": f.shared_prefix(plan.prefix_tokens, plan.question_tokens, SEED_PREFIX, 1 + plan.warm_repeats),
        "single": [f.chat(128, SEED_SINGLE + j) for j in range(plan.single_requests)] if single_name else [],
        "swap": [f.chat(128, SEED_SWAP + j) for j in range(2 + plan.swap_rounds)],
        "engine_pairs": [f.chat(128, SEED_ENGINE + j) for j in range(1 + plan.engine_pairs)],  # the first warms up
        "single_name": single_name,
    }


def raw_workload(plan: Plan, wl: dict[str, Any], model_dir: Path, work: Path) -> Path:
    """The raw engine's share of the workload, as token ids, in a file for bench_engine.py."""
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
        "engine_pairs": wl["engine_pairs"],
    }
    path = work / "raw-workload.json"
    path.write_text(json.dumps(raw_wl))
    return path


def run_raw(plan: Plan, workload_file: Path, work: Path, log: Path) -> dict[str, Any]:
    out = work / "raw-result.json"
    print("raw engine ceiling ...", flush=True)
    cmd = [sys.executable, str(BENCH_DIR / "bench_engine.py"), "raw", str(workload_file), str(out)]
    error = run_child(cmd, log, plan.raw_timeout_s)
    res: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    return {**res, "error": error} if error else res


# Before a paired raw pass: this repo returns MLX's cached buffers after 2 s idle (defaults.idle_cache_release_s),
# and the raw engine's process, on the same GPU, may need that memory.
PAIR_SETTLE_S = 3.0


class RawPartner:
    """The raw engine in a child process that runs one level pass when asked, so that its passes and this repo's
    alternate level by level (`bench_engine.py raw-paired`). On a shared GPU host the speed of a decode step moved by
    up to 2x within minutes; a ratio of passes run seconds apart is not at the mercy of that drift."""

    def __init__(self, plan: Plan, workload_file: Path, work: Path, log: Path) -> None:
        self.out, self.plan, self.error = work / "raw-result.json", plan, None
        self._log = log.open("a")
        cmd = [sys.executable, str(BENCH_DIR / "bench_engine.py"), "raw-paired", str(workload_file), str(self.out)]
        self._log.write(f"\n$ {' '.join(cmd)}\n")
        self._log.flush()
        print("raw engine ceiling (paired with this repo's passes) ...", flush=True)
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            preexec_fn=die_with_parent,
            env={**os.environ, **OFFLINE_ENV},
        )
        self._ask(None, plan.startup_timeout_s + plan.raw_timeout_s / 4)

    def _ask(self, cmd: dict[str, Any] | None, timeout_s: float) -> dict[str, Any] | None:
        """Send one command (None: only read) and wait for its answer; on any failure the partner is dropped and
        the passes it did not run are left to `finish`'s error."""
        if self.error is not None:
            return None
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            if cmd is not None:
                self.proc.stdin.write(json.dumps(cmd) + "\n")
                self.proc.stdin.flush()
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
            line = self.proc.stdout.readline() if ready else ""
            if not line:
                raise RuntimeError(f"no answer in {timeout_s:.0f}s" if not ready else "it exited")
            answer: dict[str, Any] = json.loads(line)
            return answer
        except (OSError, ValueError, RuntimeError) as exc:
            self.error = f"the raw engine failed: {exc} (see {Path(self._log.name).name})"
            self.proc.kill()
            return None

    def run_pass(self, level: int, k: int) -> None:
        """Once the raw engine has failed (out of memory beside the server, say) this does nothing: the server's
        passes go on unpaired, and the raw part's result carries the error."""
        if self.error is not None:
            return
        time.sleep(PAIR_SETTLE_S)  # on a worker thread (bench_load runs it with asyncio.to_thread)
        answer = self._ask({"level": level, "pass": k}, self.plan.level_timeout_s * 2)
        if answer is not None:
            print(
                f"  raw level {level} (pass {k + 1}/{self.plan.passes}): {answer['aggregate_tok_s']:.1f} tok/s",
                flush=True,
            )

    def finish(self) -> dict[str, Any]:
        """The passes not yet run, the probes, and the raw part's result."""
        self._ask({"finish": True}, self.plan.raw_timeout_s)
        self.proc.wait(timeout=60)
        self._log.close()
        res: dict[str, Any] = json.loads(self.out.read_text()) if self.out.exists() else {}
        return {**res, "error": self.error} if self.error else res


def _level_key(lv: dict[str, Any]) -> tuple[int, int]:
    return lv["prompt_tokens"], lv.get("concurrency", 1)


def _union(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Level rows of both, `new` replacing `old`'s rows of the same level, in plan order."""
    mine = {_level_key(lv) for lv in new}
    return sorted([lv for lv in old if _level_key(lv) not in mine] + list(new), key=_level_key)


def merge_levels(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A part's new result with the levels of its earlier result that this run did not measure (--lengths)."""
    return {**new, **{key: _union(old.get(key, []), new.get(key, [])) for key in ("levels", "stream")}}


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the `finally` blocks that stop the servers


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    args = parse_args(argv)
    parts = [p for p in args.only.split(",") if p]
    if unknown := set(parts) - set(PARTS):
        raise SystemExit(f"unknown part(s) {sorted(unknown)}; known: {', '.join(PARTS)}")
    plan = dataclasses.replace(make_plan(args.size, args.tiny), passes=max(1, args.passes))
    if args.client_procs is not None:
        plan = dataclasses.replace(plan, client_procs=max(1, args.client_procs))
    for flag, field in (("lengths", "prompt_tokens"), ("concurrencies", "concurrency")):
        if wanted := {int(n) for n in getattr(args, flag).split(",") if n}:
            plan = dataclasses.replace(plan, levels=tuple(lv for lv in plan.levels if getattr(lv, field) in wanted))
            if not plan.levels:
                raise SystemExit(f"no level left after --{flag} {sorted(wanted)}")
    out, models = args.out.resolve(), args.models.resolve()
    args.peer_site = args.peer_site.resolve()  # the peer runs from another directory, on PYTHONPATH
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
    paired = "raw" in parts and "mlx_router" in parts
    plan = fit_memory(plan, info["main"], notes, 2 if paired else 1)
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tokenizer = load_tokenizer(Path(built["main"]))
    wl = workload(plan, tokenizer, "bench-q4" if built["single"] else None)

    def count(text: str) -> int:  # for servers that send no usage (bench_common.summarize)
        return len(tokenizer.encode(text, add_special_tokens=False))

    json_path = out / f"{name}.json"
    res: dict[str, Any] = {"raw": {}, "servers": {}}
    merged: list[str] = []
    old: dict[str, Any] = {"raw": {}, "servers": {}}
    plan_levels = dataclasses.asdict(plan)["levels"]
    if args.merge and json_path.exists():
        old = json.loads(json_path.read_text())
        res.update(raw=old["raw"], servers=old["servers"])
        merged = [*old["meta"]["merged"], old["meta"]["command"]]
        plan_levels = _union(old["meta"]["plan"]["levels"], plan_levels)
        paired = paired or (old["meta"].get("paired", False) and not {"raw", "mlx_router"} & set(parts))
    res["meta"] = {
        "merged": merged,
        "command": command,
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "size": args.size,
        "tiny": args.tiny,
        "hardware": hardware_info(),
        "model": info,
        "plan": {**dataclasses.asdict(plan), "levels": plan_levels},
        "paired": paired,
    }
    res["notes"] = notes

    def save() -> str:  # after every part: a run cut short still leaves its figures so far
        res["servers"] = {k: res["servers"][k] for k in PARTS[1:] if k in res["servers"]}
        json_path.write_text(json.dumps(res, indent=1))
        md = render(res)
        (out / f"{name}.md").write_text(md)
        return md

    now = lambda: dt.datetime.now().isoformat(timespec="seconds")  # noqa: E731
    raw_start, partner = now(), None
    if "raw" in parts:
        raw_file = raw_workload(plan, wl, model_dir, work)
        if paired:
            partner = RawPartner(plan, raw_file, work, log)
        else:
            raw_res = {**run_raw(plan, raw_file, work, log), "ran": [raw_start, now()], "passes": plan.passes}
            res["raw"] = merge_levels(old["raw"], raw_res)
            save()
    for key in (p for p in PARTS[1:] if p in parts):
        start = now()
        why = check_peer(args.peer_site) if key == "mlx_router_231" else None
        pair = partner.run_pass if partner and key == "mlx_router" else None
        result = (
            {"status": "skipped", "reason": why}
            if why
            else bench_server(key, model_dir, work, wl, plan, out / "logs", args.peer_site, count, pair)
        )
        res["servers"][key] = merge_levels(
            old["servers"].get(key, {}),
            {**result, "ran": [start, now()], "passes": plan.passes, "client_procs": plan.client_procs},
        )
        if partner and key == "mlx_router":  # the raw part ends before any peer starts: its memory is returned
            raw_res = {**partner.finish(), "ran": [raw_start, now()], "passes": plan.passes}
            res["raw"] = merge_levels(old["raw"], raw_res)
            partner = None
        save()
    md = save()
    print(f"\nwrote {out / (name + '.md')} and {json_path}\n", flush=True)
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
