"""Diagnostic: where does single-stream TTFT go? Server TTFT with and without the prefix cache, and the cost of
copying a cached KV entry. python benchmarks/ttft_probe.py --models DIR"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).resolve().parents[1])]

import openai  # noqa: E402
from bench_common import PromptFactory  # noqa: E402
from bench_engine import build  # noqa: E402
from bench_servers import ServerProcess, ServerSpec, free_port  # noqa: E402


def ttft(client: openai.OpenAI, messages: list[dict[str, str]], model: str) -> float:
    start = time.perf_counter()
    first = None
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=16, stream=True):  # type: ignore[arg-type]
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
    return first or float("nan")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", type=Path, default=Path("/tmp/m"))
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args()
    models = build("gpu", args.tiny, args.models)
    main_dir = Path(models["main"])
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    model, tok = load(str(main_dir))
    cache = make_prompt_cache(model)
    model(mx.array([list(range(2176))]), cache=cache)
    mx.eval([c.state for c in cache])
    for _ in range(3):
        t = time.perf_counter()
        c2 = copy.deepcopy(cache)
        mx.eval([c.state for c in c2])
        print(f"deepcopy of a 2176-token KV cache: {1e3 * (time.perf_counter() - t):.1f} ms", flush=True)
    factory = PromptFactory(tok)
    short = [factory.chat(128, 10 + i)[0] for i in range(8)]
    long = [factory.chat(2048, 100 + i)[0] for i in range(4)]
    del model, cache, c2
    mx.clear_cache()
    for label, extra in (("prefix cache on", {}), ("prefix cache off", {"prefix_cache_gb": 0})):
        work = Path(tempfile.mkdtemp())
        port = free_port()
        cfg = {
            "defaults": {"model_directory": str(main_dir.parent), "cache_size": 1, "max_batch_size": 32, **extra},
            "server": {"ip": "127.0.0.1", "port": port, "log_dir": str(work)},
            "models": {},
        }
        (work / "c.json").write_text(json.dumps(cfg))
        root = Path(__file__).resolve().parents[1]
        spec = ServerSpec(
            "ours",
            [sys.executable, str(root / "main.py"), "--config", str(work / "c.json")],
            root,
            dict(os.environ),
            {},
            "",
        )
        server = ServerProcess(spec, port, work / "server.log")
        server.start()
        print(label, "ready:", server.wait_ready(120), flush=True)
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=300)
        name = main_dir.name
        ttft(client, short[0], name)
        ttft(client, long[0], name)
        s = [ttft(client, m, name) for m in short[1:]]
        g = [ttft(client, m, name) for m in long[1:]]
        print(
            f"{label}: TTFT 128-token median {1e3 * statistics.median(s):.1f} ms {[round(x * 1e3) for x in s]}; "
            f"2048-token median {1e3 * statistics.median(g):.1f} ms {[round(x * 1e3) for x in g]}",
            flush=True,
        )
        server.stop()
        print((work / "server.log").read_text()[-1500:])


if __name__ == "__main__":
    main()
