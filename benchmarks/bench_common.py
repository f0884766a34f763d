"""Shared pieces of the benchmark: the plan of each size, prompts of exact token length, statistics, the hardware line
and child-process hygiene. No MLX import here: the orchestrator stays light and the servers own the accelerator."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
# Children never reach a hub: every model is a local folder.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}

# Plain words; prompts are random sequences of them (content is irrelevant to a random model).
_TEXT = (
    "the quick brown fox jumps over lazy dog while cat sleeps in sun small language model runs on laptop and "
    "answers questions about weather Paris is sunny warm London cold grey raining please write short story robot "
    "who learns to cook pasta for friends numbers dates prices router loads several models keeps hot ones memory "
    "swaps rest tokens are generated one at time each new token depends before function calls return name city"
)
WORDS = tuple(_TEXT.split())


@dataclass(frozen=True)
class Level:
    prompt_tokens: int
    concurrency: int
    requests: int  # sent through `concurrency` workers (a closed loop)


@dataclass(frozen=True)
class Plan:
    """What one run measures. Every request of a level has its own prompt, the same for every server."""

    size: str
    tiny: bool
    levels: tuple[Level, ...]
    output_tokens: int  # max_tokens of every measured request
    prefix_tokens: int  # shared-prefix probe: system prompt length
    warm_every_concurrency: bool  # GPU: a short burst at each concurrency first, so JIT compilation is not timed
    level_timeout_s: float
    raw_timeout_s: float
    temperature: float = 1.0  # a random model decoded greedily repeats one token, often whitespace
    question_tokens: int = 32
    warm_repeats: int = 2  # prefix probe: new questions after the cold one
    single_requests: int = 4  # concurrency-1 requests (one after another)
    probe_tokens: int = 8  # max_tokens of the prefix and swap probes, which measure TTFT
    swap_rounds: int = 3
    startup_timeout_s: float = 300.0
    # Servers without batching stop at this concurrency (beyond it a level mostly measures queueing).
    serial_max_concurrency: int = 1 << 30
    passes: int = 1  # each level this many times, with new prompts; the pass with the median aggregate is reported
    client_procs: int = 1  # processes the load's clients are spread over (bench_clients.ClientPool)
    engine_pairs: int = 8  # in-process probe: requests to this repo's engine, each next to one to stream_generate

    @property
    def prompt_lengths(self) -> list[int]:
        return sorted({lv.prompt_tokens for lv in self.levels})

    @property
    def concurrencies(self) -> list[int]:
        return sorted({lv.concurrency for lv in self.levels})


def _levels(spec: dict[int, Sequence[int]], single: int) -> tuple[Level, ...]:
    return tuple(Level(n, c, single if c == 1 else c) for n, cs in spec.items() for c in cs)


def make_plan(size: str, tiny: bool) -> Plan:
    """`cpu`: a small float32 model, 2048-token prompts up to 32 streams (CPU prefill is ~2k tokens/s on 2 cores).
    `gpu`: Llama-3.1-8B's shape, every level to 128 streams, but a server without batching (mlx-router 2.3.1) stops
    at 32, where 128 streams would take it minutes of queueing; its load comes from 4 client processes (a 2-core CPU run
    keeps one, which would otherwise take the cores the server needs). `tiny`: the same code path in a minute or two."""
    gpu = size == "gpu"
    if tiny:
        levels = _levels({128: (1, 8), 2048: (1,)}, 2)
        return Plan(
            size, True, levels, 64, 1024, gpu, 120.0, 600.0, single_requests=2, serial_max_concurrency=1, engine_pairs=2
        )
    if gpu:
        levels = _levels({128: (1, 8, 32, 128), 2048: (1, 8, 32, 128)}, 4)
        return Plan(
            size,
            False,
            levels,
            128,
            4096,
            True,
            120.0,
            900.0,
            serial_max_concurrency=32,
            client_procs=4,
            engine_pairs=24,
        )
    return Plan(size, False, _levels({128: (1, 8, 32, 128), 2048: (1, 8, 32)}, 4), 128, 4096, False, 300.0, 1200.0)


# ---- statistics ----


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile, q in [0, 100]; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def median(values: Sequence[float]) -> float | None:
    return percentile(values, 50.0)


# ---- prompts ----

Prompt = tuple[list[dict[str, str]], list[int]]  # chat messages for the servers, token ids for the raw engine


class PromptFactory:
    """Chat messages whose rendered prompt (chat template + generation prompt) has an exact token count."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self._one_token = [w for w in WORDS if len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1] or ["a"]

    def render(self, messages: list[dict[str, str]]) -> list[int]:
        ids = self.tok.apply_chat_template(messages, add_generation_prompt=True)
        if isinstance(ids, dict):  # some transformers versions return a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def _fit(self, build: Any, target: int, rng: random.Random) -> Prompt:
        """`build(words)` gives messages; choose words so that the rendered prompt has `target` tokens."""
        words = [rng.choice(WORDS) for _ in range(target + 8)]
        lo, hi = 0, len(words)
        while lo < hi:  # the largest k whose prompt fits; token counts only grow with k
            mid = (lo + hi + 1) // 2
            if len(self.render(build(words[:mid]))) <= target:
                lo = mid
            else:
                hi = mid - 1
        chosen = words[:lo]
        ids = self.render(build(chosen))
        for _ in range(64):  # fill the last gap with one-token words
            if len(ids) >= target:
                break
            trial = [*chosen, rng.choice(self._one_token)]
            trial_ids = self.render(build(trial))
            if len(trial_ids) > target:
                break
            chosen, ids = trial, trial_ids
        return build(chosen), ids

    def chat(self, target: int, seed: int) -> Prompt:
        """One user message; distinct seeds give prompts that differ from their first word on (no shared prefix)."""
        return self._fit(lambda ws: [{"role": "user", "content": " ".join(ws)}], target, random.Random(seed))

    def shared_prefix(self, prefix_tokens: int, question_tokens: int, seed: int, questions: int) -> list[Prompt]:
        """A ~`prefix_tokens` system prompt shared by `questions` requests that differ in their final question."""
        system = self.chat(prefix_tokens, seed)[0][0]["content"]
        out = []
        for i in range(questions):
            rng = random.Random(seed * 1000 + i + 1)
            question = " ".join(rng.choice(WORDS) for _ in range(question_tokens))
            messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
            out.append((messages, self.render(messages)))
        return out


# ---- processes and environment ----


def die_with_parent() -> None:
    """`preexec_fn` for children: SIGKILL when the benchmark dies (Linux), so a killed run leaves no server behind."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _first_line(cmd: list[str]) -> str | None:
    if not shutil.which(cmd[0]):
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def gpu_memory_gb() -> float | None:
    """Total memory of the first NVIDIA GPU in GB (10^9 bytes), from nvidia-smi; None without one."""
    out = _first_line(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"])
    try:
        return float(out.splitlines()[0]) * 2**20 / 1e9 if out else None  # nvidia-smi says MiB
    except ValueError:
        return None


def hardware_info() -> dict[str, Any]:
    """CPU model, GPU names, RAM, MLX versions and MLX's default device (read in a child process)."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram_gb = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        ram_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)
    probe = (
        "import json, importlib.metadata as m, mlx.core as mx;"
        "print(json.dumps({'mlx': mx.__version__, 'mlx_lm': m.version('mlx-lm'), 'device': str(mx.default_device())}))"
    )
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
        mlx_info = json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        mlx_info = {"error": "could not import mlx"}
    gpus = _first_line(["nvidia-smi", "-L"])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": ram_gb,
        "gpu": gpus.replace("\n", "; ") if gpus else None,
        "gpu_memory_gb": gpu_memory_gb(),
        "python": platform.python_version(),
        **mlx_info,
    }


# ---- per-request records and their summary (servers and the raw engine alike) ----


@dataclass
class ReqResult:
    """One request: when it was sent, when each content chunk (raw engine: each token) arrived, and its tokens."""

    t_send: float
    chunk_times: list[float] = field(default_factory=list)
    t_end: float | None = None
    completion_tokens: int | None = None  # from usage; None when the server sends none
    error: str | None = None
    text: str = ""  # the answer's content, to count the tokens of a server that sends no usage

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.t_send if self.chunk_times else None


def median_pass(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """Several passes of one level as one: the pass with the median aggregate tokens/s (the lower middle of an even
    count), so every figure of a row comes from one pass, plus every pass's aggregate, TTFT p50 and decode rate."""
    ranked = sorted(passes, key=lambda s: s["aggregate_tok_s"] or 0.0)
    return {
        **ranked[(len(ranked) - 1) // 2],
        "passes_aggregate_tok_s": [s["aggregate_tok_s"] for s in passes],
        "passes_ttft_p50_s": [s["ttft_p50_s"] for s in passes],
        "passes_decode_tok_s_p50": [s["decode_tok_s_p50"] for s in passes],
    }


def summarize(
    rs: list[ReqResult], wall: float, requested: int, max_tokens: int, count: Callable[[str], int] | None = None
) -> dict[str, Any]:
    """Figures of one level. TTFT: send to first content. ITL: per request, (end - first content) / (tokens - 1), the
    time per output token after the first; it does not depend on how a server's detokenizer groups tokens into chunks
    (chunk gaps are kept as `chunk_gap_*`). Aggregate: output tokens of the level / its wall time. A server that sends
    no usage is credited `max_tokens` per answer; `count` (the model's tokenizer) re-tokenizes every answer's text into
    `text_tokens`, the check on that credit."""
    ok = [r for r in rs if r.ok]
    tokens = [max_tokens if r.completion_tokens is None else r.completion_tokens for r in ok]
    ttfts = [t for r in ok if (t := r.ttft) is not None]
    itls = [
        (r.t_end - r.chunk_times[0]) / (n - 1)
        for r, n in zip(ok, tokens, strict=True)
        if n > 1 and r.chunk_times and r.t_end and r.t_end > r.chunk_times[0]
    ]
    gaps = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False)]
    return {
        "requested": requested,
        "ok": len(ok),
        "errors": sorted({r.error for r in rs if r.error})[:5],
        "wall_s": wall,
        "ttft_p50_s": median(ttfts),
        "ttft_p95_s": percentile(ttfts, 95),
        "itl_p50_s": median(itls),
        "itl_p95_s": percentile(itls, 95),
        "decode_tok_s_p50": median([1 / x for x in itls]),
        "chunk_gap_p50_s": median(gaps),
        "chunk_gap_p95_s": percentile(gaps, 95),
        "chunks_per_token": sum(len(r.chunk_times) for r in ok) / sum(tokens) if sum(tokens) else None,
        "completion_tokens": sum(tokens),
        "tokens_assumed": any(r.completion_tokens is None for r in ok),
        "early_stops": sum(1 for r in ok if r.completion_tokens is not None and r.completion_tokens < max_tokens),
        "aggregate_tok_s": sum(tokens) / wall if wall > 0 and ok else None,
        "text_tokens": sum(count(r.text) for r in ok) if count else None,
    }
