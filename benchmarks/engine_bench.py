"""Engine overhead benchmark: ModelEngine in-process (no HTTP) against raw mlx-lm on the same model.

    python benchmarks/engine_bench.py [--model PATH] [--tokens 256] [--concurrency 32] [--rounds 5]

Without --model it builds a random model (sizes from the flags; by default a tiny one, where per-token Python
overhead shows most) in a temporary folder. It reports, for one stream, time to first token and decode tokens/s
of raw `generate_step` (stream_generate's loop, without its EOS stop) and of the engine, and for N concurrent
requests the aggregate tokens/s of raw `BatchGenerator` and of the engine (wall time from submit to the last
token, prefill included). Raw and engine runs alternate, `--rounds` times after a warm-up round; medians are
printed as JSON. Each engine request has a new prompt, so the prefix cache does not shorten its prefill."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from helper_tools.tiny_models import build_random_model  # noqa: E402
from mlx_router.config.discovery import read_model_spec  # noqa: E402
from mlx_router.core.engine import EngineOptions, ModelEngine  # noqa: E402
from mlx_router.core.types import Done, GenerationRequest, Message, SamplingParams, Started  # noqa: E402

PROMPT = "the quick brown fox jumps over the lazy dog while the cat sleeps near a warm fire"


class Raw:
    """mlx-lm without the engine: `generate_step` for one stream, `BatchGenerator` for many."""

    def __init__(self, path: Path) -> None:
        from mlx_lm import load

        self.model, tok = load(str(path))[:2]
        self.prompt = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)

    def single(self, tokens: int) -> tuple[float, float]:
        """(time to first token in ms, decode tokens/s); `generate_step` does not stop at EOS."""
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        start, first, n = time.perf_counter(), 0.0, 0
        for _tok, _lp in generate_step(mx.array(self.prompt), self.model, max_tokens=tokens):
            first = first or time.perf_counter()
            n += 1
        return (first - start) * 1000, (n - 1) / (time.perf_counter() - first)

    def batch(self, tokens: int, concurrency: int, temperature: float, own_samplers: bool = False) -> float:
        """Aggregate tokens/s from insert to the last token; one sampler for the whole batch (one sampling call per
        step), or with `own_samplers` one per sequence (BatchGenerator then samples row by row)."""
        from mlx_lm.generate import BatchGenerator
        from mlx_lm.sample_utils import make_sampler

        gen = BatchGenerator(self.model, completion_batch_size=concurrency, prefill_batch_size=8, stop_tokens=[])
        n_samplers = concurrency if own_samplers else 1
        samplers = [make_sampler(temp=temperature) for _ in range(n_samplers)] * (concurrency // n_samplers)
        gen.insert([list(self.prompt)] * concurrency, max_tokens=[tokens] * concurrency, samplers=samplers)
        start, n = time.perf_counter(), 0
        while responses := gen.next_generated():
            n += len(responses)
        gen.close()
        return n / (time.perf_counter() - start)


class Engine:
    def __init__(self, path: Path, concurrency: int, temperature: float) -> None:
        self.engine = ModelEngine(read_model_spec("bench", path), EngineOptions(max_batch_size=concurrency))
        self.temperature = temperature
        self.tokens = 0  # completion tokens of the last run, to check that no request stopped early
        self._n = 0

    async def one(self, tokens: int) -> tuple[float, float, float, int]:
        self._n += 1  # a new prompt each time, so the prefix cache does not shorten the prefill
        text = f"{self._n} {PROMPT}"
        handle = self.engine.submit(
            GenerationRequest(
                "b", "bench", (Message("user", text),), SamplingParams(max_tokens=tokens, temperature=self.temperature)
            )
        )
        start, first = time.perf_counter(), 0.0
        async for event in handle.events():
            if not first and not isinstance(event, Started):
                first = time.perf_counter()
            if isinstance(event, Done):
                return start, first, time.perf_counter(), event.usage.completion_tokens
        raise RuntimeError("the request failed")

    async def single(self, tokens: int) -> tuple[float, float]:
        start, first, end, n = await self.one(tokens)
        self.tokens = n
        return (first - start) * 1000, (n - 1) / (end - first)

    async def batch(self, tokens: int, concurrency: int) -> float:
        start = time.perf_counter()
        results = await asyncio.gather(*(self.one(tokens) for _ in range(concurrency)))
        self.tokens = sum(r[3] for r in results)
        return self.tokens / (time.perf_counter() - start)


async def measure(path: Path, tokens: int, concurrency: int, rounds: int, temperature: float) -> dict[str, Any]:
    """Raw and engine runs interleaved, `rounds` times after one unmeasured warm-up round; medians."""
    raw, eng = Raw(path), Engine(path, concurrency, temperature)
    await eng.engine.start()
    runs: dict[str, list[float]] = {}
    for r in range(rounds + 1):
        got = {}
        got["raw_ttft_ms"], got["raw_single_tps"] = raw.single(tokens)
        got["engine_ttft_ms"], got["engine_single_tps"] = await eng.single(tokens)
        got["engine_single_tokens"] = eng.tokens
        got["raw_batch_tps"] = raw.batch(tokens, concurrency, temperature)
        got["raw_batch_own_samplers_tps"] = raw.batch(tokens, concurrency, temperature, own_samplers=True)
        got["engine_batch_tps"] = await eng.batch(tokens, concurrency)
        got["engine_batch_tokens"] = eng.tokens
        for k, v in got.items():
            if r > 0:
                runs.setdefault(k, []).append(v)
    await eng.engine.stop()
    out: dict[str, Any] = {k: round(statistics.median(v), 2) for k, v in runs.items()}
    out["single_ratio"] = round(out["engine_single_tps"] / out["raw_single_tps"], 3)
    out["ttft_delta_ms"] = round(out["engine_ttft_ms"] - out["raw_ttft_ms"], 2)
    out["batch_ratio"] = round(out["engine_batch_tps"] / out["raw_batch_tps"], 3)
    out["peak_batch_size"] = eng.engine.peak_batch_size
    out["moves_to_batch"] = getattr(eng.engine, "moves_to_batch", None)  # absent before the single-stream path
    out["moves_to_solo"] = getattr(eng.engine, "moves_to_solo", None)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="an MLX model folder (default: build a random one)")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--temperature", type=float, default=0.0, help="raw single stream stays greedy")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=0, help="pad the vocabulary to this size (0: the tokenizer's)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or build_random_model(
            Path(tmp) / "random",
            hidden_size=args.hidden,
            num_layers=args.layers,
            intermediate_size=args.hidden * 4,
            vocab_size=args.vocab or None,
        )
        result = asyncio.run(measure(path, args.tokens, args.concurrency, args.rounds, args.temperature))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
