"""Everything that calls MLX directly, in a child process so that its memory is returned before any server starts.

    python benchmarks/bench_engine.py build SIZE TINY MODELS_DIR OUT.json   # build (or reuse) the benchmark models
    python benchmarks/bench_engine.py raw WORKLOAD.json OUT.json            # the raw ceiling, no HTTP
    python benchmarks/bench_engine.py raw-paired WORKLOAD.json OUT.json     # the same, one pass per stdin command

Models come from `helper_tools.tiny_models.build_random_model` (random weights), the 4-bit copy from `mlx_lm.convert`.
The raw ceiling runs mlx-lm's `stream_generate` and `BatchGenerator` on the very token ids the servers get as chat
messages, with the same closed loop, sampler and stop tokens.
"""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import ReqResult, median, median_pass, summarize

_LLAMA31 = {  # Llama-3.1's config-only fields and untied output head (not part of tiny_models' defaults)
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "tie_word_embeddings": False,
}
# A vocabulary padded with word tokens (tiny_models' vocab_size): a random model then mostly emits whole words, which
# stream one per token, and rarely samples its end token (about 1 answer in 10 stops early at the base ~640 tokens).
_SMALL = {"num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "vocab_size": 4096, "max_position_embeddings": 16384}
SHAPES: dict[str, dict[str, Any]] = {
    # MLX's CPU backend multiplies at a few GFLOP/s here: hidden 128 keeps 2048-token levels to seconds per request.
    "cpu": {**_SMALL, "hidden_size": 128, "intermediate_size": 256, "dtype": "float32"},
    "gpu": {
        "hidden_size": 4096,
        "num_layers": 32,
        "num_heads": 32,
        "num_kv_heads": 8,
        "intermediate_size": 14336,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "dtype": "bfloat16",
        "config_overrides": _LLAMA31,
    },
    # `--tiny`: the code path of a size in a minute; on the GPU path still bf16 with Llama-3.1's config.
    "cpu-tiny": {**_SMALL, "hidden_size": 64, "intermediate_size": 128, "dtype": "float32"},
    "gpu-tiny": {
        **_SMALL,
        "hidden_size": 64,
        "intermediate_size": 128,
        "dtype": "bfloat16",
        "config_overrides": _LLAMA31,
    },
}
MARKER = ".bench-build.json"  # written last: a folder without it is an interrupted build
SAMPLER: Any = None  # set by RawCeiling: the workload's temperature, one sampler shared by every sequence


def _reuse_or_build(dest: Path, want: dict[str, Any], make: Any) -> str:
    try:
        if json.loads((dest / MARKER).read_text()) == want:
            return str(dest)
    except (OSError, ValueError):
        pass
    shutil.rmtree(dest, ignore_errors=True)
    t0 = time.perf_counter()
    make()
    (dest / MARKER).write_text(json.dumps(want))
    print(f"built {dest} in {time.perf_counter() - t0:.1f}s", flush=True)
    return str(dest)


def build(size: str, tiny: bool, models_dir: Path) -> dict[str, Any]:
    """`main` serves the load levels; on a GPU `single` (4-bit) serves the single-stream and swap figures."""
    import mlx.core as mx
    from mlx_lm import convert

    from helper_tools.tiny_models import build_random_model

    name = f"{size}{'-tiny' if tiny else ''}"
    shape = SHAPES[name]
    main = models_dir / name
    builder = Path(sys.modules[build_random_model.__module__].__file__ or "")
    want = {"shape": shape, "builder": hashlib.sha256(builder.read_bytes()).hexdigest()[:16]}
    out: dict[str, Any] = {"main": _reuse_or_build(main, want, lambda: build_random_model(main, **shape))}
    mx.clear_cache()
    out["single"] = None
    if size == "gpu":  # MLX's CUDA quantized matmul does not scale with batch: 4-bit serves single stream and swap
        q4 = models_dir / f"{name}-q4"
        make_q4 = lambda: convert(str(main), str(q4), quantize=True, q_bits=4, q_group_size=64)  # noqa: E731
        out["single"] = _reuse_or_build(q4, {**want, "bits": 4, "group_size": 64}, make_q4)
    return out


# ---- raw ceiling ----


def _stream(model: Any, tok: Any, prompt: list[int], max_tokens: int, cache: Any = None) -> ReqResult:
    from mlx_lm import stream_generate

    r = ReqResult(time.perf_counter())
    n = 0
    for resp in stream_generate(model, tok, prompt, max_tokens=max_tokens, sampler=SAMPLER, prompt_cache=cache):
        if resp.finish_reason != "stop":  # the stop token itself is no output
            r.chunk_times.append(time.perf_counter())
            n += 1
    r.t_end, r.completion_tokens = time.perf_counter(), n
    return r


def _in_turn(rs: list[ReqResult], max_tokens: int) -> dict[str, Any]:
    """Figures of requests sent one after another: the wall time is the sum of theirs."""
    return summarize(rs, sum(r.t_end - r.t_send for r in rs if r.t_end), len(rs), max_tokens)


def closed_loop(model: Any, tok: Any, prompts: list[list[int]], concurrency: int, max_tokens: int) -> dict[str, Any]:
    """`BatchGenerator` fed like the servers: `concurrency` sequences, each finished one replaced by the next prompt."""
    from mlx_lm.generate import BatchGenerator

    gen: Any = BatchGenerator(
        model,
        sampler=SAMPLER,
        stop_tokens=[[t] for t in tok.eos_token_ids],
        completion_batch_size=concurrency,
        prefill_batch_size=min(8, concurrency),
    )
    todo = list(prompts)
    live: dict[int, ReqResult] = {}
    done: list[ReqResult] = []

    def send() -> None:
        (uid,) = gen.insert([todo.pop(0)], max_tokens=[max_tokens])
        live[uid] = ReqResult(time.perf_counter(), completion_tokens=0)

    t0 = time.perf_counter()
    for _ in range(min(concurrency, len(todo))):
        send()
    steps_left = len(prompts) * (max_tokens + max(len(p) for p in prompts)) + 1000  # never loops forever
    while live and steps_left > 0:
        steps_left -= 1
        _, responses = gen.next()
        now = time.perf_counter()
        for resp in responses:
            r = live[resp.uid]
            if resp.finish_reason != "stop":
                r.chunk_times.append(now)
                r.completion_tokens = (r.completion_tokens or 0) + 1
            if resp.finish_reason is not None:
                r.t_end = now
                done.append(live.pop(resp.uid))
                if todo:
                    send()
    wall = time.perf_counter() - t0
    gen.close()
    if live:
        raise RuntimeError("BatchGenerator did not finish its sequences")
    return summarize(done, wall, len(prompts), max_tokens)


def prefix(model: Any, tok: Any, prompts: list[list[int]]) -> dict[str, Any]:
    """Cold TTFT of prefix + question, then warm TTFTs: the prefix's KV cache kept, only the new question prefilled."""
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

    cache = make_prompt_cache(model)
    cold = _stream(model, tok, prompts[0], 1, cache).ttft
    warm, prev = [], prompts[0]
    for p in prompts[1:]:
        common = next((i for i, (a, b) in enumerate(zip(prev, p, strict=False)) if a != b), min(len(prev), len(p)))
        common = min(common, len(p) - 1)
        trim_prompt_cache(cache, cache[0].offset - common)
        warm.append(_stream(model, tok, p[common:], 1, cache).ttft)
        prev = p
    return {"prompt_tokens": len(prompts[0]), "cold_ttft_s": cold, "warm_ttft_s": median(warm), "warm_runs": warm}


def engine_vs_stream(
    model: Any, tok: Any, path: str, prompts: list[Any], max_tokens: int, temperature: float
) -> dict[str, Any]:
    """Concurrency 1 through this repo's engine (in this process, no HTTP), each request next to one to
    `stream_generate` on the same prompt, alternating which goes first; `prompts[0]` warms both up unmeasured.

    A single stream's decode step is bound by the CPU that builds and launches its kernels, and on a shared GPU host
    two processes' CPU speeds drifted apart by up to 1.4x at the same moment (session 7 diagnostics, H200): a server
    and the raw engine in separate processes differ by that drift as much as by their code. These pairs share one
    process (though not always one core)."""
    import asyncio

    from mlx_router.config.discovery import read_model_spec
    from mlx_router.core.engine import EngineOptions, ModelEngine
    from mlx_router.core.types import Done, Failed, GenerationRequest, Message, SamplingParams, TextDelta

    async def ask(engine: Any, messages: list[dict[str, str]], i: int) -> ReqResult:
        turns = tuple(Message(m["role"], m["content"]) for m in messages)  # type: ignore[arg-type]
        sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature)
        r = ReqResult(time.perf_counter())
        async for event in engine.submit(GenerationRequest(f"probe-{i}", "bench", turns, sampling)).events():
            if isinstance(event, TextDelta):
                r.chunk_times.append(time.perf_counter())
            elif isinstance(event, Done):
                r.t_end, r.completion_tokens = time.perf_counter(), event.usage.completion_tokens
            elif isinstance(event, Failed):
                r.error = str(event.error)
        return r

    async def run() -> tuple[list[ReqResult], list[ReqResult]]:
        engine = ModelEngine(read_model_spec("bench", Path(path)), EngineOptions())
        await engine.start()
        mine, raw = [], []
        try:
            for i, (messages, ids) in enumerate(prompts):
                if i % 2:
                    raw.append(_stream(model, tok, ids, max_tokens))
                mine.append(await ask(engine, messages, i))
                if not i % 2:
                    raw.append(_stream(model, tok, ids, max_tokens))
        finally:
            await engine.stop()
        return mine[1:], raw[1:]

    mine, raw = asyncio.run(run())
    decode = lambda r: summarize([r], 1.0, 1, max_tokens)["decode_tok_s_p50"]  # noqa: E731
    ratios = [a / b for m, r in zip(mine, raw, strict=True) if (a := decode(m)) and (b := decode(r))]
    return {
        "pairs": len(ratios),
        "engine": _in_turn(mine, max_tokens),
        "stream": _in_turn(raw, max_tokens),
        "ratios": ratios,
        "ratio_median": median(ratios),
    }


class RawCeiling:
    """The raw engine on one workload: load and warm-up, then level passes in any order, then the probes."""

    def __init__(self, work: dict[str, Any], out_path: Path) -> None:
        import mlx.core as mx
        from mlx_lm.sample_utils import make_sampler

        global SAMPLER
        SAMPLER = make_sampler(work["temperature"], top_p=1.0)
        self.work, self.out_path = work, out_path
        self.res: dict[str, Any] = {"device": str(mx.default_device()), "levels": [], "stream": []}
        self.passes: dict[tuple[int, int], tuple[dict[str, Any] | None, dict[str, Any]]] = {}
        self.model: Any = None
        self.tok: Any = None
        self.res["load_first_s"] = self._load(work["main"])
        for p in (work["warm_long"], work["warm_short"][0]):  # compile kernels before anything is timed
            _stream(self.model, self.tok, p, 4)
        for c in work["warm_concurrencies"]:
            closed_loop(self.model, self.tok, work["warm_short"][:c], c, 4)
        mx.clear_cache()  # a paired server loads next: it needs the memory the warm-up left cached
        self.save("warmed up")

    def save(self, what: str) -> None:
        self.out_path.write_text(json.dumps(self.res, indent=1))
        print(f"raw: {what}", flush=True, file=sys.stderr)

    def _load(self, path: str) -> float:
        """Drop the model held (its memory returned first), load the one at `path`; the load's seconds."""
        import mlx.core as mx
        from mlx_lm import load

        self.model = self.tok = None
        gc.collect()
        mx.clear_cache()
        t = time.perf_counter()
        self.model, self.tok = load(path)[:2]
        return time.perf_counter() - t

    def run_pass(self, level: int, k: int) -> float | None:
        """Pass `k` of level `level` (its k-th batch of prompts); its aggregate tok/s. At concurrency 1 it also runs
        the single-stream ceiling, `stream_generate`, on the same prompts."""
        import mlx.core as mx

        lv, n_out = self.work["levels"][level], self.work["output_tokens"]
        n = len(lv["prompts"]) // self.work["passes"]
        batch = lv["prompts"][k * n : (k + 1) * n]
        stream = None
        if lv["concurrency"] == 1:
            rs = [_stream(self.model, self.tok, p, n_out) for p in batch]
            stream = _in_turn(rs, n_out)
        self.passes[level, k] = (stream, closed_loop(self.model, self.tok, batch, lv["concurrency"], n_out))
        mx.clear_cache()  # another process (a paired server) may need the memory next
        return self.passes[level, k][1]["aggregate_tok_s"]

    def finish(self) -> None:
        """Any pass not yet run, every level's median pass, then the prefix, single-stream and swap probes."""
        work = self.work
        for i, lv in enumerate(work["levels"]):
            for k in range(work["passes"]):
                if (i, k) not in self.passes:
                    self.run_pass(i, k)
            loops = [self.passes[i, k][1] for k in range(work["passes"])]
            streams = [s for k in range(work["passes"]) if (s := self.passes[i, k][0]) is not None]
            if streams:
                self.res["stream"].append({"prompt_tokens": lv["prompt_tokens"], **median_pass(streams)})
            summary = median_pass(loops)
            self.res["levels"].append(
                {"prompt_tokens": lv["prompt_tokens"], "concurrency": lv["concurrency"], **summary}
            )
            self.save(f"{lv['prompt_tokens']}x{lv['concurrency']}: {summary['passes_aggregate_tok_s']} tok/s")
        res = self.res
        res["prefix"] = prefix(self.model, self.tok, work["prefix"])
        self.save(f"prefix {res['prefix']['cold_ttft_s']:.3f}s -> {res['prefix']['warm_ttft_s']:.3f}s")
        if work["engine_pairs"]:
            try:
                c1 = engine_vs_stream(
                    self.model, self.tok, work["main"], work["engine_pairs"], work["output_tokens"], work["temperature"]
                )
                what = (
                    f"engine in-process, c=1: {c1['ratio_median'] or 0:.2f}x stream_generate over {c1['pairs']} pairs"
                )
            except Exception as exc:  # e.g. no memory for the engine's copy: the probes after it still run
                c1, what = {"error": f"{type(exc).__name__}: {exc}"}, f"engine in-process, c=1, failed: {exc}"
            res["engine_c1"] = c1
            self.save(what)
        if work["single_model"]:  # the 4-bit model: single stream, after one unmeasured request
            self._load(work["single_model"])
            _stream(self.model, self.tok, work["warm_short"][0], 4)
            n_out = work["output_tokens"]
            rs = [_stream(self.model, self.tok, p, n_out) for p in work["single"]]
            res["single"] = _in_turn(rs, n_out)
            self.save(f"single model: {res['single']['decode_tok_s_p50'] or 0:.1f} tok/s")
        # Swap ceiling: a warm process drops its model, loads the other copy from disk and serves one request.
        res["swap_load_s"] = self._load(work["swap_b"])
        res["swap_first_ttft_s"] = _stream(self.model, self.tok, work["swap_prompt"], 4).ttft
        res["swap_ceiling_s"] = res["swap_load_s"] + res["swap_first_ttft_s"]
        self.save(f"swap: load {res['swap_load_s']:.2f}s + first TTFT {res['swap_first_ttft_s']:.3f}s")


def serve_passes(ceiling: RawCeiling) -> None:
    """Paired mode: one JSON command per stdin line, one JSON answer per stdout line. `{"level": i, "pass": k}` runs
    that pass; `{"finish": true}` (or the end of stdin) runs what is left and the probes, then exits."""
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("finish"):
            break
        rate = ceiling.run_pass(cmd["level"], cmd["pass"])
        print(json.dumps({"aggregate_tok_s": rate}), flush=True)
    ceiling.finish()
    print(json.dumps({"finished": True}), flush=True)


def main(argv: list[str]) -> int:
    if argv[0] == "build":
        size, tiny, models_dir, out = argv[1], argv[2] == "1", Path(argv[3]), Path(argv[4])
        out.write_text(json.dumps(build(size, tiny, models_dir)))
    elif argv[0] in ("raw", "raw-paired"):
        ceiling = RawCeiling(json.loads(Path(argv[1]).read_text()), Path(argv[2]))
        if argv[0] == "raw":
            ceiling.finish()
        else:
            serve_passes(ceiling)
    else:
        raise SystemExit(__doc__)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
