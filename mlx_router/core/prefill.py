"""How the engine feeds prompts to mlx-lm's BatchGenerator: the chunk size per backend and the prompt batch's size.

Runs on the engine thread. The two functions that look at a generator read its internals (mlx-lm 0.32); if those
change, they fall back to mlx-lm's own behaviour.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# A pass of prompts may read as many tokens as this many full chunks: mlx-lm reads 8 prompts per pass.
FULL_CHUNKS_PER_PASS = 8


def prefill_step_for() -> int:
    """Prompt tokens per prefill chunk for the default device.

    On a GPU each chunk pays a fixed launch of the whole model (8-15 ms of CPU work per forward pass on the H100 and
    H200 hosts, whatever its size), so mlx-lm's 2,048 keeps a long prompt's TTFT down. Paired with raw mlx-lm on an
    H200, 2,048-token prompts at c=1 had their first token 37 ms later than raw with 512-token chunks and 14 ms later
    with 2,048; at c=32 the aggregate went from 0.84x to 0.92x of raw. On MLX's CPU backend compute dominates and
    512-token chunks beat 2,048 (TTFT 1.4-1.9x lower, benchmarks/BENCHMARKS.md).
    """
    import mlx.core as mx

    return 512 if mx.default_device() == mx.cpu else 2048


def prompts_that_fit(chunks: Iterable[int], budget: int) -> int:
    """How many of the leading prompts, whose next chunks have these lengths, one forward pass of `budget` tokens
    reads: each row is padded to the longest chunk. Never fewer than one."""
    n = widest = 0
    for chunk in chunks:
        widest = max(widest, chunk)
        if n and (n + 1) * widest > budget:
            break
        n += 1
    return max(n, 1)


def size_prompt_batch(gen: Any) -> None:
    """Let the next prompt batch take as many waiting prompts as fit in the tokens of 8 full chunks.

    mlx-lm reads at most 8 prompts per forward pass, and each pass of prompts and each decode step between two
    passes pay the launch of the whole model. 32 short prompts arriving together took four prompt batches and eight
    steps before the last had its first token; read in one pass of the same token budget (8 x 2,048 on a GPU), all
    32 start decoding after two. Long prompts still go 8 at a time, so the peak memory of a pass stays mlx-lm's, and
    the prompt batch and the decoding batch together stay within the generator's decoding batch size.
    """
    try:
        if not gen._unprocessed_sequences:  # every decode step asks: answer the common case before building lists
            return
        step, room = gen.prefill_step_size, gen.completion_batch_size - len(gen._generation_batch)
        rows = [segments for segments, _, _ in gen._currently_processing]
        waiting = [seq[1] for seq in gen._unprocessed_sequences]
    except (AttributeError, TypeError, ValueError):
        return
    chunks = (min(len(segments[0]), step) for segments in [*rows, *waiting])
    gen.prefill_batch_size = max(1, min(prompts_that_fit(chunks, FULL_CHUNKS_PER_PASS * step), room))


def prefill_in_progress(gen: Any) -> bool:
    """Whether `gen` holds prompts it has not started decoding: not yet read, or in its prompt batch.

    If the internals change, nothing is held. A prompt batch whose prompts are read but not yet decoding counts too:
    prompts added to it then would be merged into its KV caches and split out again as strided views of them, and
    on the H200 such a pass of 16 prompts took 102 ms against 48 ms for a prompt batch of its own.
    """
    try:
        return bool(gen._unprocessed_sequences) or len(gen._prompt_batch) > 0
    except (AttributeError, TypeError):
        return False
