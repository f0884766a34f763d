"""GPU benchmark: raw mlx-lm ceiling vs mlx-router vs mlx_lm.server on a random Llama-3.1-8B-shaped model.

    python benchmarks/gpu_bench.py --out DIR [--skip-peer]

Builds the models (bf16 and 4-bit, random weights in the real shape, a padded tiny tokenizer), measures the raw
engine (stream_generate, BatchGenerator), then each server over HTTP with the openai SDK, and prints a markdown
report (also written to DIR/gpu-results.md with the raw JSON beside it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from helper_tools.tiny_models import build_random_model  # noqa: E402

SHAPE = {
    "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "intermediate_size": 14336, "vocab_size": 128256, "rope_theta": 500000.0, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "model_type": "llama",
}  # fmt: skip
OUT_TOKENS = 128
PREFIX_TOKENS = 4096


def build(root: Path) -> tuple[Path, Path]:
    """bf16 and 4-bit copies of an 8B-shaped model, sharing a tiny tokenizer padded to the real vocab."""
    from mlx_lm.models import llama

    base = build_random_model(root / "tok")
    tok = json.loads((base / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    for i in range(len(vocab), SHAPE["vocab_size"]):
        vocab[f"Ġw{i}"] = i  # decodable filler ids, so random sampling never hits an unknown id
    paths = []
    for name, bits in (("llama8b-bf16", None), ("llama8b-4bit", 4)):
        path = root / name
        path.mkdir(parents=True, exist_ok=True)
        for f in ("tokenizer_config.json", "generation_config.json"):
            shutil.copy(base / f, path / f)
        (path / "tokenizer.json").write_text(json.dumps(tok))
        cfg = {**json.loads((base / "config.json").read_text()), **SHAPE}
        mx.random.seed(0)
        model = llama.Model(llama.ModelArgs.from_dict(cfg))
        model.set_dtype(mx.bfloat16)
        if bits:
            nn.quantize(model, group_size=64, bits=bits)
            cfg["quantization"] = {"group_size": 64, "bits": bits}
        mx.eval(model.parameters())
        (path / "config.json").write_text(json.dumps(cfg))
        mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
        del model
        mx.clear_cache()
        paths.append(path)
    return paths[0], paths[1]


def prompt_text(tokenizer: Any, n_tokens: int, salt: str = "") -> str:
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "the",
        "lazy",
        "dog",
        "while",
        "the",
        "cat",
        "sleeps",
        "near",
        "a",
        "warm",
        "fire",
    ]
    text, i = salt, 0
    while len(tokenizer.encode(text)) < n_tokens - 12:  # the chat template adds ~12 tokens
        text += " " + words[i % len(words)]
        i += 1
    return text


def raw_ceiling(path: Path, batch_sizes: list[int]) -> dict[str, Any]:
    from mlx_lm import load, stream_generate
    from mlx_lm.generate import BatchGenerator

    t0 = time.perf_counter()
    model, tok = load(str(path))[:2]
    out: dict[str, Any] = {"load_s": time.perf_counter() - t0}
    prompt = tok.apply_chat_template([{"role": "user", "content": prompt_text(tok, 128)}], add_generation_prompt=True)
    for _ in range(2):  # the second run is the measured one (kernels compiled)
        start, first, n = time.perf_counter(), None, 0
        for r in stream_generate(model, tok, prompt, max_tokens=OUT_TOKENS):
            first = first or time.perf_counter()
            n = r.generation_tokens
        end = time.perf_counter()
    out["ttft_s"] = first - start  # type: ignore[operator]
    out["decode_tps"] = (n - 1) / (end - first)  # type: ignore[operator]
    for b in batch_sizes:
        for _ in range(2):  # the first round compiles this batch size's kernels; the second is measured
            gen = BatchGenerator(model, completion_batch_size=b, prefill_batch_size=min(b, 8), stop_tokens=[])
            gen.insert([list(prompt)] * b, max_tokens=[OUT_TOKENS] * b)
            start, n = time.perf_counter(), 0
            while responses := gen.next_generated():
                n += len(responses)
            out[f"batch{b}_tps"] = n / (time.perf_counter() - start)
            gen.close()
            del gen
    del model
    mx.clear_cache()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(cmd: list[str], port: int, log: Path) -> subprocess.Popen[bytes]:
    import httpx

    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2)
            return proc
        except httpx.TransportError:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()[-2000:]}") from None
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start")


async def one(client: Any, model: str, content: str, max_tokens: int = OUT_TOKENS) -> dict[str, float]:
    start = time.perf_counter()
    stamps: list[float] = []
    usage = None
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0.0,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
        if chunk.usage:
            usage = chunk.usage
    tokens = usage.completion_tokens if usage else len(stamps)
    ttft = stamps[0] - start if stamps else float("nan")
    decode = (tokens - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    cached = (usage.prompt_tokens_details.cached_tokens or 0) if usage and usage.prompt_tokens_details else 0
    return {"ttft": ttft, "decode_tps": decode, "tokens": tokens, "cached": cached, "end": time.perf_counter()}


async def load_levels(port: int, model: str, tok: Any, levels: list[int]) -> dict[str, Any]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=600, max_retries=0)
    # Every request gets its own prompt, so no server answers from its prefix cache here.
    prompts = iter([prompt_text(tok, 128, f"Request {i}:") for i in range(1 + 4 + 2 * sum(levels))])
    await one(client, model, next(prompts), 16)  # warm-up: load and compile
    out: dict[str, Any] = {}
    for c in levels:
        if c > 1:  # a warm-up round at this concurrency compiles its batch shapes, as for the raw ceiling
            await asyncio.gather(*(one(client, model, next(prompts), 16) for _ in range(c)), return_exceptions=True)
        start = time.perf_counter()
        if c == 1:  # a single stream: requests one after another
            rs = [await one(client, model, next(prompts)) for _ in range(4)]
        else:
            got = await asyncio.gather(*(one(client, model, next(prompts)) for _ in range(c)), return_exceptions=True)
            rs = [r for r in got if isinstance(r, dict)]
            if len(rs) < c:
                out[f"c{c}_failed"] = c - len(rs)
            if not rs:
                continue
        wall = max(r["end"] for r in rs) - start
        ttfts = sorted(r["ttft"] for r in rs)
        out[f"c{c}"] = {
            "agg_tps": sum(r["tokens"] for r in rs) / wall,
            "ttft_p50": statistics.median(ttfts),
            "ttft_p95": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))],
            "decode_tps_p50": statistics.median(r["decode_tps"] for r in rs),
        }
    prefix = prompt_text(tok, PREFIX_TOKENS, "Reference text follows.")
    cold = await one(client, model, prefix + " Question one?", 8)
    warm = await one(client, model, prefix + " Question two?", 8)
    out["prefix"] = {"cold_ttft": cold["ttft"], "warm_ttft": warm["ttft"], "cached": warm["cached"]}
    await client.close()
    return out


def run_router(models: Path, model: str, tok: Any, levels: list[int], log: Path, **defaults: Any) -> dict[str, Any]:
    port = free_port()
    cfg = {"defaults": {"model_directory": str(models), "max_batch_size": 128, "timeout": 600, **defaults}}
    (models / "router.json").write_text(json.dumps(cfg))
    proc = start_server(
        [sys.executable, "main.py", "--config", str(models / "router.json"), "--port", str(port)], port, log
    )
    try:
        return asyncio.run(load_levels(port, model, tok, levels))
    finally:
        proc.terminate()
        proc.wait(60)


def run_mlx_lm(path: Path, tok: Any, levels: list[int], log: Path) -> dict[str, Any]:
    port = free_port()
    cmd = [sys.executable, "-m", "mlx_lm.server", "--model", str(path), "--port", str(port),
           "--decode-concurrency", "128", "--prompt-concurrency", "8"]  # fmt: skip
    proc = start_server(cmd, port, log)
    try:
        return asyncio.run(load_levels(port, str(path), tok, levels))
    finally:
        proc.terminate()
        proc.wait(60)


async def swap_ttft(port: int, tok: Any) -> float:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=600, max_retries=0)
    p = prompt_text(tok, 128)
    await one(client, "llama8b-4bit", p, 4)
    await one(client, "swap-b", p, 4)
    await one(client, "llama8b-4bit", p, 4)
    ttft = (await one(client, "swap-b", p, 4))["ttft"]  # B evicted A: this TTFT includes a full load
    await client.close()
    return ttft


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--models", type=Path, default=Path("/tmp/bench-models"))
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="a small shape, to check the script on a CPU")
    args = ap.parse_args()
    global PREFIX_TOKENS
    if args.tiny:
        SHAPE.update(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=512, vocab_size=4096)  # fmt: skip
        PREFIX_TOKENS = 1024
    args.out.mkdir(parents=True, exist_ok=True)
    from mlx_lm import load

    t0 = time.perf_counter()
    bf16, q4 = build(args.models)
    res: dict[str, Any] = {"build_s": time.perf_counter() - t0, "device": str(mx.default_device())}
    smi = shutil.which("nvidia-smi")
    gpu = subprocess.run([smi, "-L"], capture_output=True, text=True).stdout.strip() if smi else ""
    res["gpu"] = gpu or platform.processor()
    tok = load(str(q4))[1]
    levels = [1, 8] if args.tiny else [1, 8, 32, 128]
    res["raw_bf16"] = raw_ceiling(bf16, levels)
    res["raw_4bit"] = raw_ceiling(q4, [])
    print(json.dumps(res, indent=1), flush=True)
    res["router_bf16"] = run_router(args.models, "llama8b-bf16", tok, levels, args.out / "router-bf16.log")
    print(json.dumps(res["router_bf16"], indent=1), flush=True)
    res["router_4bit"] = run_router(args.models, "llama8b-4bit", tok, [1], args.out / "router-4bit.log")
    os.symlink(q4, args.models / "swap-b")
    port = free_port()
    (args.models / "swap.json").write_text(
        json.dumps({"defaults": {"model_directory": str(args.models), "cache_size": 1}})
    )
    proc = start_server([sys.executable, "main.py", "--config", str(args.models / "swap.json"), "--port", str(port)],
                        port, args.out / "router-swap.log")  # fmt: skip
    try:
        res["swap_ttft"] = asyncio.run(swap_ttft(port, tok))
    finally:
        proc.terminate()
        proc.wait(60)
    if not args.skip_peer:
        res["mlx_lm_bf16"] = run_mlx_lm(bf16, tok, levels, args.out / "mlx-lm-bf16.log")
    (args.out / "gpu-results.json").write_text(json.dumps(res, indent=1))
    report = render(res)
    (args.out / "gpu-results.md").write_text(report)
    print(report)


def render(r: dict[str, Any]) -> str:
    raw, rt, peer = r["raw_bf16"], r["router_bf16"], r.get("mlx_lm_bf16")
    lines = [f"GPU: {r['gpu']} ({r['device']}), {platform.python_version()}", "",
             "| bf16, 128-token prompts, 128 out | raw mlx-lm | mlx-router | ratio to raw | mlx_lm.server "
             "| ratio to mlx_lm |",
             "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip

    def row(name: str, raw_v: float | None, ours: float, theirs: float | None) -> None:
        ratio = f"{ours / raw_v:.2f}" if raw_v else ""
        peer_s = f"{theirs:.1f}" if theirs is not None else "n/a"
        peer_r = f"{ours / theirs:.2f}" if theirs else ""
        lines.append(f"| {name} | {raw_v:.1f} | {ours:.1f} | {ratio} | {peer_s} | {peer_r} |" if raw_v else
                     f"| {name} | | {ours:.1f} | | {peer_s} | {peer_r} |")  # fmt: skip

    row("c=1 decode tok/s", raw["decode_tps"], rt["c1"]["decode_tps_p50"], peer and peer["c1"]["decode_tps_p50"])
    lines.append(f"| (raw BatchGenerator at batch 1) | {raw['batch1_tps']:.1f} | | | | |")
    row("c=1 TTFT ms", raw["ttft_s"] * 1e3, rt["c1"]["ttft_p50"] * 1e3, peer and peer["c1"]["ttft_p50"] * 1e3)
    for c in (c for c in (8, 32, 128) if f"c{c}" in rt):
        theirs = peer.get(f"c{c}") if peer else None
        row(f"c={c} aggregate tok/s", raw.get(f"batch{c}_tps"), rt[f"c{c}"]["agg_tps"], theirs and theirs["agg_tps"])
        row(f"c={c} TTFT p50 ms", None, rt[f"c{c}"]["ttft_p50"] * 1e3, theirs and theirs["ttft_p50"] * 1e3)
        row(f"c={c} TTFT p95 ms", None, rt[f"c{c}"]["ttft_p95"] * 1e3, theirs and theirs["ttft_p95"] * 1e3)
        if peer and f"c{c}_failed" in peer:
            lines.append(f"| c={c}: mlx_lm.server dropped {peer[f'c{c}_failed']} of {c} connections | | | | | |")
    p = rt["prefix"]
    q = r["raw_4bit"]
    lines += ["", f"Prefix cache (4k-token shared prefix): cold TTFT {p['cold_ttft'] * 1e3:.0f} ms, warm "
              f"{p['warm_ttft'] * 1e3:.0f} ms ({p['cold_ttft'] / p['warm_ttft']:.1f}x), cached tokens {p['cached']}",
              f"4-bit single stream: raw {q['decode_tps']:.1f} tok/s, mlx-router "
              f"{r['router_4bit']['c1']['decode_tps_p50']:.1f} tok/s "
              f"({r['router_4bit']['c1']['decode_tps_p50'] / q['decode_tps']:.2f} of raw)",
              f"Swap (4-bit): TTFT after swap {r['swap_ttft'] * 1e3:.0f} ms vs raw load {q['load_s'] * 1e3:.0f} ms + "
              f"cold TTFT {q['ttft_s'] * 1e3:.0f} ms = {(q['load_s'] + q['ttft_s']) * 1e3:.0f} ms "
              f"({r['swap_ttft'] / (q['load_s'] + q['ttft_s']):.2f}x)"]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
