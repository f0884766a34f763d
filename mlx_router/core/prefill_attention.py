"""Prefill attention with small scores on MLX's CUDA backend: plain MLX ops instead of cuDNN.

MLX 0.32 runs prefill attention in cuDNN, which builds a graph for every new set of shapes (rows, query length, key
length, the mask's) and keeps up to 256 of them. A server seldom sees a shape twice: prompts differ in length, and a
burst of requests reaches the prompt batch split in new ways (1 + 31, 8 + 24 ...). So the calls whose attention
scores are small run as the MLX ops that MLX itself falls back to (scale, two matmuls, mask, a float32 softmax),
whose setup for a new shape is small; larger ones keep cuDNN, whose fused kernel never writes the scores out.

An 8B model's forward pass on an H200, first use of a shape / its repeat, in ms (BENCHMARKS.md, session 11):

| rows x tokens | cuDNN | these ops |
| --- | --- | --- |
| 9 x 127, left-padded | 81 / 33 | 46 / 36 |
| 32 x 128, left-padded | 748 / 101 | 112 / 104 |
| 1 x 300, causal | 62 / 12 | 31 / 16 |
| 1 x 777, causal | 101 / 25 | 56 / 36 |
| 4 x 1,024, left-padded | 212 / 141 | 130 / 123 |
| 1 x 2,048, causal | 879 / 52 | 79 / 74 |

A repeated shape costs the ops up to 22 ms more in one pass, 43 ms for a prompt of 2,748 tokens in two chunks
(cuDNN's causal kernel skips the masked half); a new one up to 800 ms less. 8 x 2,047, with 8 times `MAX_SCORES`
scores, stays in cuDNN: 930 / 843 ms. Pure rule, testable without a GPU; the ops run on any backend.
"""

from __future__ import annotations

from typing import Any

MAX_SCORES = 1 << 27  # attention scores of one call (rows x heads x queries x keys): 512 MiB in float32


def takes_unfused(q_shape: tuple[int, ...], k_shape: tuple[int, ...], *, has_sinks: bool) -> bool:
    """Whether a call runs as plain ops: more than one query (a decode step is served elsewhere), at most as many
    queries as keys (a causal mask aligns them at the end), no sinks, and scores within `MAX_SCORES`."""
    if has_sinks or len(q_shape) != 4 or len(k_shape) != 4:
        return False
    rows, heads, queries, _ = q_shape
    keys = k_shape[2]
    return 1 < queries <= keys and rows * heads * queries * keys <= MAX_SCORES


def unfused_attention(q: Any, k: Any, v: Any, *, scale: float, mask: Any) -> Any:
    """softmax(q k^T * scale + mask) v for q of shape (B, H, L, D), K of (B, H_kv, S, D) and V of (B, H_kv, S, D_v),
    H a multiple of H_kv (DeepSeek-V2's D is 192 and D_v 128). `mask` is None, "causal" (query i sees keys up to
    S - L + i), a boolean array (True: attend) or an additive one, broadcastable to (B, H, L, S). A query that may
    see no key (left padding) averages all of them instead of yielding NaN, as MLX's own fallback does: NaN in a
    padded row would reach every row through V."""
    import mlx.core as mx

    rows, heads, queries, dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    per_kv = heads // kv_heads
    q = (q * scale).reshape(rows, kv_heads, per_kv, queries, dim)  # grouped heads share their K and V
    scores = q @ mx.expand_dims(k, 2).swapaxes(-1, -2)
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unknown attention mask {mask!r}")
        mask = mx.arange(queries)[:, None] + (keys - queries) >= mx.arange(keys)[None]
    elif mask is not None:
        mask = _grouped(mask, kv_heads, per_kv)
    if mask is not None and mask.dtype == mx.bool_:
        scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
    elif mask is not None:
        scores = scores + mask.astype(scores.dtype)  # a float32 mask would promote the scores and all that follows
    weights = mx.softmax(scores, axis=-1, precise=True)
    return (weights @ mx.expand_dims(v, 2)).reshape(rows, heads, queries, v.shape[-1])  # V's head size may differ


def _grouped(mask: Any, kv_heads: int, per_kv: int) -> Any:
    """A mask broadcastable to (B, H, L, S) laid out like the grouped scores, (B, H_kv or 1, per_kv or 1, L, S)."""
    import mlx.core as mx

    mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    if mask.shape[1] == 1:
        return mx.expand_dims(mask, 2)
    return mask.reshape(mask.shape[0], kv_heads, per_kv, *mask.shape[2:])
