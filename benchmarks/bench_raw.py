"""The raw engine ceiling, in-process, no HTTP: `mlx_lm.load`, `stream_generate` and `BatchGenerator`.

Run as a child process by run_bench.py: ``python benchmarks/bench_raw.py WORKLOAD.json OUT.json``. The workload
holds token-id prompts (the same construction the servers get as chat messages); the result is one JSON object.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import median, percentile

SAMPLER: Any = None  # set in main(): the workload's temperature, one shared sampler


def _stream_once(model: Any, tok: Any, prompt: list[int], max_tokens: int, cache: Any = None) -> dict[str, Any]:
    from mlx_lm import stream_generate

    t0 = time.perf_counter()
    first = last = None
    n = 0
    resp: Any = None
    for r in stream_generate(model, tok, prompt, max_tokens=max_tokens, prompt_cache=cache, sampler=SAMPLER):
        resp, last = r, time.perf_counter()
        if first is None:
            first = last
        n += 1
    assert first is not None and last is not None and resp is not None
    decode = (n - 1) / (last - first) if n > 1 and last > first else None
    return {"ttft_s": first - t0, "tokens": n, "decode_tok_s": decode, "prompt_tps": resp.prompt_tps}


def single_stream(model: Any, tok: Any, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    runs = [_stream_once(model, tok, p, max_tokens) for p in prompts]
    return {
        "prompt_tokens": len(prompts[0]),
        "runs": runs,
        "ttft_p50_s": median([r["ttft_s"] for r in runs]),
        "decode_tok_s": median([r["decode_tok_s"] for r in runs if r["decode_tok_s"]]),
        "tokens": median([r["tokens"] for r in runs]),
    }


def batch(model: Any, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """All prompts inserted at t0, one shared sampler (batched sampling), no stop tokens (exact lengths).

    TTFT per sequence; steady decode = tokens per second once every sequence is decoding."""
    from mlx_lm.generate import BatchGenerator

    b = len(prompts)
    gen = BatchGenerator(model, sampler=SAMPLER, completion_batch_size=b, prefill_batch_size=min(8, b))
    t0 = time.perf_counter()
    uids = gen.insert(prompts, max_tokens=[max_tokens] * b)
    first: dict[int, float] = {}
    total = 0
    done = 0
    all_started_at: float | None = None
    tokens_when_all_started = 0
    while done < len(uids):
        _, responses = gen.next()
        now = time.perf_counter()
        for r in responses:
            first.setdefault(r.uid, now)
            total += 1
            if r.finish_reason is not None:
                done += 1
        if all_started_at is None and len(first) == b:
            all_started_at, tokens_when_all_started = now, total
    end = time.perf_counter()
    gen.close()
    ttfts = [first[u] - t0 for u in uids]
    steady = None
    if all_started_at is not None and end > all_started_at and total > tokens_when_all_started:
        steady = (total - tokens_when_all_started) / (end - all_started_at)
    return {
        "prompt_tokens": len(prompts[0]),
        "batch": b,
        "tokens": total,
        "wall_s": end - t0,
        "ttft_p50_s": median(ttfts),
        "ttft_p95_s": percentile(ttfts, 95),
        "steady_decode_tok_s": steady,
        "step_ms": 1000.0 * b / steady if steady else None,
        "aggregate_tok_s": total / (end - t0),
    }


def prefix(model: Any, tok: Any, prompts: list[list[int]]) -> dict[str, Any]:
    """Cold TTFT of prefix+question, then warm TTFTs: the cached prefix kept, only the new question prefilled."""
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

    cache = make_prompt_cache(model)
    cold = _stream_once(model, tok, prompts[0], 1, cache)["ttft_s"]
    warm = []
    prev = prompts[0]
    for p in prompts[1:]:
        common = next((i for i, (a, c) in enumerate(zip(prev, p, strict=False)) if a != c), min(len(prev), len(p)))
        common = min(common, len(p) - 1)
        trim_prompt_cache(cache, cache[0].offset - common)
        warm.append(_stream_once(model, tok, p[common:], 1, cache)["ttft_s"])
        prev = p
    return {"prompt_tokens": len(prompts[0]), "cold_ttft_s": cold, "warm_ttft_s": median(warm), "warm_runs": warm}


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    work = json.loads(Path(args[0]).read_text())
    out_path = Path(args[1])
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.sample_utils import make_sampler

    global SAMPLER
    SAMPLER = make_sampler(work["temperature"])
    result: dict[str, Any] = {"device": str(mx.default_device()), "mlx": mx.__version__}

    def save() -> None:
        out_path.write_text(json.dumps(result, indent=2))

    t = time.perf_counter()
    model, tok = load(work["model_a"])[:2]
    result["load_first_s"] = time.perf_counter() - t
    out_tokens = work["output_tokens"]
    # Warm-up: compile kernels for the shapes below before anything is timed.
    for w in work["warmup_single"]:
        _stream_once(model, tok, w, 4)
    batch(model, work["warmup_batch"], 4)
    print(f"raw: loaded in {result['load_first_s']:.2f}s, warmed up", flush=True)

    result["single"] = []
    for prompts in work["single"]:
        result["single"].append(single_stream(model, tok, prompts, out_tokens))
        r = result["single"][-1]
        print(
            f"raw single L={r['prompt_tokens']}: ttft {r['ttft_p50_s']:.3f}s decode {r['decode_tok_s']:.1f} tok/s",
            flush=True,
        )
        save()
    result["batch"] = []
    for prompts in work["batch"]:
        # Best of two where cheap (a ceiling; small runs are noisy on a shared CPU), else one run.
        runs = 2 if len(prompts) * len(prompts[0]) <= work["repeat_below_tokens"] else 1
        r = max((batch(model, prompts, out_tokens) for _ in range(runs)), key=lambda x: x["aggregate_tok_s"])
        result["batch"].append({**r, "runs": runs})
        print(
            f"raw batch L={r['prompt_tokens']} B={r['batch']}: ttft {r['ttft_p50_s']:.3f}s "
            f"agg {r['aggregate_tok_s']:.1f} tok/s steady {r['steady_decode_tok_s'] or 0:.1f}",
            flush=True,
        )
        save()
    result["prefix"] = prefix(model, tok, work["prefix"])
    save()
    # Swap ceiling: a warmed-up process frees the model, loads the other copy, serves one request.
    del model, tok
    gc.collect()
    mx.clear_cache()
    t = time.perf_counter()
    model, tok = load(work["model_b"])[:2]
    result["load_warm_s"] = time.perf_counter() - t
    result["cold_ttft_after_load_s"] = _stream_once(model, tok, work["swap_prompt"], 4)["ttft_s"]
    result["swap_ceiling_s"] = result["load_warm_s"] + result["cold_ttft_after_load_s"]
    print(f"raw: load {result['load_warm_s']:.2f}s + cold ttft {result['cold_ttft_after_load_s']:.3f}s", flush=True)
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
