"""Shared pieces of the benchmark: the plan (levels, sizes, time limits), prompts of exact token length, statistics
and the hardware line. No MLX import at module level: the orchestrator stays light and the servers own the GPU."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent

# Plain words; the prompts are random sequences of them (content is irrelevant to a random model).
_TEXT = (
    "the quick brown fox jumps over lazy dog while cat sleeps in sun small language model runs on laptop and "
    "answers questions about weather Paris is sunny warm London cold grey raining please write short story robot "
    "who learns to cook pasta for friends numbers dates prices router loads several models keeps hot ones memory "
    "swaps rest tokens are generated one at time each new token depends before function calls return name city "
    "she said thanks lot he answered you welcome no problem streaming responses send every piece text client as "
    "soon ready good morning evening night people greet other many ways if context window full request fails "
    "with error length water boils degrees ice melts zero science explains world around us code test fix bugs "
    "then again until check passes"
)
WORDS = _TEXT.split()
UNUSED_RE = re.compile(r"<unused\d+>")  # padding tokens of build_random_model(vocab_size=...): one token each


@dataclass(frozen=True)
class Level:
    prompt_tokens: int
    concurrency: int
    requests: int


@dataclass(frozen=True)
class Plan:
    size: str
    quick: bool
    levels: tuple[Level, ...]
    output_tokens: int
    temperature: float = 1.0  # a random model decoded greedily tends to repeat one token, often whitespace
    prefix_tokens: int = 4096
    question_tokens: int = 32
    warm_repeats: int = 2
    probe_tokens: int = 8  # max_tokens of the prefix and swap probes (they measure TTFT)
    swap_rounds: int = 3  # requests that each force a model swap
    raw_single_repeats: int = 3
    raw_repeat_below_tokens: int = 1 << 30  # raw batch runs with fewer prompt tokens are measured twice (best kept)
    level_timeout_s: float = 300.0
    startup_timeout_s: float = 180.0
    warmup_timeout_s: float = 600.0
    raw_timeout_s: float = 1200.0
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def prompt_lengths(self) -> list[int]:
        return sorted({lv.prompt_tokens for lv in self.levels})

    @property
    def max_concurrency(self) -> int:
        return max(lv.concurrency for lv in self.levels)


def _levels(spec: dict[int, tuple[Sequence[int], int, int]]) -> tuple[Level, ...]:
    """{prompt_tokens: (concurrencies, requests per unit of concurrency, minimum requests)}."""
    return tuple(
        Level(length, c, max(minimum, per * c)) for length, (concs, per, minimum) in spec.items() for c in concs
    )


def make_plan(size: str, quick: bool) -> Plan:
    if size == "gpu":
        if quick:
            return Plan(
                "gpu",
                True,
                _levels({128: ((1, 8, 32), 1, 4), 2048: ((1, 8), 1, 2)}),
                64,
                raw_repeat_below_tokens=70_000,
            )
        return Plan(
            "gpu",
            False,
            _levels({128: ((1, 8, 32, 128), 2, 4), 2048: ((1, 8, 32, 128), 2, 4)}),
            128,
            raw_repeat_below_tokens=70_000,
            level_timeout_s=600,
            raw_timeout_s=1800,
        )
    if quick:
        return Plan(
            "cpu",
            True,
            _levels({128: ((1, 8), 1, 2), 2048: ((1,), 1, 2)}),
            32,
            warm_repeats=1,
            raw_repeat_below_tokens=20_000,
            swap_rounds=2,
            raw_single_repeats=2,
            level_timeout_s=180,
            warmup_timeout_s=300,
            raw_timeout_s=600,
        )
    # MLX's CPU backend prefills ~1k tokens/s here even for the tiny model: 2048-token levels stop at 32 streams.
    note = "CPU plan: 2048-token levels stop at concurrency 32 with N = max(4, c) (CPU prefill is ~1k tokens/s)."
    return Plan(
        "cpu",
        False,
        _levels({128: ((1, 8, 32, 128), 2, 4), 2048: ((1, 8, 32), 1, 4)}),
        128,
        level_timeout_s=400,
        raw_repeat_below_tokens=20_000,
        notes=(note,),
    )


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


class PromptFactory:
    """Chat messages whose rendered prompt (chat template + generation prompt) has an exact token count."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self._single = [w for w in WORDS if len(self._raw_ids(" " + w)) == 1] or ["a"]

    def _raw_ids(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def render(self, messages: list[dict[str, str]]) -> list[int]:
        ids = self.tok.apply_chat_template(messages, add_generation_prompt=True)
        if isinstance(ids, dict):  # some transformers versions return a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def count_tokens(self, text: str) -> int:
        """Tokens of a completion text; `<unusedN>` padding tokens count one each (they never re-encode as one)."""
        n = len(UNUSED_RE.findall(text))
        rest = UNUSED_RE.sub("", text)
        return n + (len(self._raw_ids(rest)) if rest else 0)

    def _fit(self, build: Any, target: int, rng: random.Random) -> tuple[list[dict[str, str]], list[int]]:
        """`build(words)` gives messages; choose words so that the rendered prompt has `target` tokens."""
        words = [rng.choice(WORDS) for _ in range(max(8, target + 8))]
        lo, hi = 0, len(words)
        while lo < hi:  # largest k whose prompt fits; token counts only grow with k
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
            trial = [*chosen, rng.choice(self._single)]
            trial_ids = self.render(build(trial))
            if len(trial_ids) > target:
                break
            chosen, ids = trial, trial_ids
        return build(chosen), ids

    def chat(self, target: int, seed: int) -> tuple[list[dict[str, str]], list[int]]:
        """One user message; `seed` makes each request's prompt distinct from its first words on."""
        rng = random.Random(seed)
        return self._fit(lambda ws: [{"role": "user", "content": " ".join(ws)}], target, rng)

    def shared_prefix(self, prefix_tokens: int, question_tokens: int, seed: int, questions: int) -> list[Any]:
        """A ~`prefix_tokens` system prompt shared by `questions` requests that differ in their final question."""
        system, _ = self.chat(prefix_tokens, seed)
        sys_text = system[0]["content"]
        out = []
        for i in range(questions):
            rng = random.Random(seed * 1000 + i + 1)
            q = [rng.choice(WORDS) for _ in range(question_tokens)]
            messages = [{"role": "system", "content": sys_text}, {"role": "user", "content": " ".join(q)}]
            out.append((messages, self.render(messages)))
        return out


# ---- environment ----


def _first_line(cmd: list[str]) -> str | None:
    if not shutil.which(cmd[0]):
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def hardware_info(python: str = sys.executable) -> dict[str, Any]:
    """CPU model, GPU names, RAM, MLX versions and MLX's default device (read in a child process)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gb = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        ram_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)
    probe = (
        "import json, importlib.metadata as m, mlx.core as mx;"
        "print(json.dumps({'mlx': mx.__version__, 'mlx_lm': m.version('mlx-lm'),"
        " 'device': str(mx.default_device())}))"
    )
    mlx_info: dict[str, Any] = {}
    try:
        out = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
        mlx_info = json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        mlx_info = {"error": "could not import mlx"}
    gpus = _first_line(["nvidia-smi", "-L"])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": ram_gb,
        "gpu": gpus.replace("\n", "; ") if gpus else None,
        "python": platform.python_version(),
        "os": platform.platform(),
        **mlx_info,
    }


def plan_dict(plan: Plan) -> dict[str, Any]:
    return asdict(plan)
