"""Batched decode attention on MLX's CUDA backend: one kernel per layer where MLX would run its unfused fallback.

mlx-lm's `BatchGenerator` left-pads rows of different lengths, so every decode step of a batch passes a boolean mask
to `mx.fast.scaled_dot_product_attention`. MLX 0.32's CUDA backend has no fused kernel for one query with an array
mask (cuDNN's decode path and the vector kernel both refuse it), so each layer falls back to about seven ops: mask
conversion, scaling, two matmuls, masking, a float32 softmax and reshapes. Those ops cost CPU time to launch, which
bounds a decode step at batch 8-32, and GPU time that grows with the context. `install()` routes exactly those calls
to `masked_decode_attention` below, and prefill calls with small scores to plain ops (`prefill_attention.py`: cuDNN
builds a graph for every new shape); every other call (long prefill, a lone sequence, which has no mask, other
backends) reaches MLX unchanged. On an H200 with an 8B model, steps in one process with the routing switched in
turn: batch 8 1.18x, 32 1.39x, 128 3.5x, 32 rows of 1,800-token prompts 2.1x faster (BENCHMARKS.md, session 9).

The kernel: one thread block per (row, KV head), so K and V are read once for the query heads that share them. Its
warps take every 8th key; each lane holds `D / 32` of every head's dimensions, and an online softmax in float32 keeps
one pass over K and V. The warps' partial results are merged in shared memory. Masked keys are skipped, so the
padding costs no reads. K and V are read in place from the cache's strided views. The kernel takes each array's
strides but expects the head axis (the last) to be contiguous. That holds for every layout mlx-lm produces: heads
split from a projection's last axis, and the cache's buffers.
"""

from __future__ import annotations

import os
import struct
import threading
from typing import Any

from loguru import logger

from .prefill_attention import takes_unfused, unfused_attention

WARPS = 8
SHARED_BYTES = 48 * 1024  # static shared memory a block may use without opting in
DISABLE_ENV = "MLX_ROUTER_STOCK_ATTENTION"  # "1": keep MLX's own path (to compare, or if the kernel misbehaves)
_HEAD_DIMS = (64, 96, 128, 160, 192, 256)  # multiples of the 32 lanes: each lane holds D / 32 of a head
_SOURCE = """
    constexpr int PER_LANE = D / 32;
    const float scale = __int_as_float(SCALE_BITS);
    const float neg_inf = __int_as_float(0xff800000);
    const int kv_heads = k_shape[1];
    const int keys = k_shape[2];
    const int b = blockIdx.x / kv_heads, hk = blockIdx.x % kv_heads;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

    float qv[REP][PER_LANE];
    for (int r = 0; r < REP; ++r) {
        const T* qp = q + b * q_strides[0] + (hk * REP + r) * q_strides[1] + lane * PER_LANE;
        for (int i = 0; i < PER_LANE; ++i) qv[r][i] = static_cast<float>(qp[i]) * scale;
    }
    const T* kb = k + b * k_strides[0] + hk * k_strides[1] + lane * PER_LANE;
    const T* vb = v + b * v_strides[0] + hk * v_strides[1] + lane * PER_LANE;
    const bool* mb = mask + b * mask_strides[0];

    float m[REP], l[REP], acc[REP][PER_LANE];
    for (int r = 0; r < REP; ++r) {
        m[r] = neg_inf;
        l[r] = 0.0f;
        for (int i = 0; i < PER_LANE; ++i) acc[r][i] = 0.0f;
    }
    for (int j = warp; j < keys; j += WARPS) {
        if (!mb[j * mask_strides[3]]) continue;
        float kj[PER_LANE], vj[PER_LANE], s[REP];
        for (int i = 0; i < PER_LANE; ++i) kj[i] = static_cast<float>(kb[j * k_strides[2] + i]);
        for (int i = 0; i < PER_LANE; ++i) vj[i] = static_cast<float>(vb[j * v_strides[2] + i]);
        for (int r = 0; r < REP; ++r) {
            s[r] = 0.0f;
            for (int i = 0; i < PER_LANE; ++i) s[r] += qv[r][i] * kj[i];
        }
        for (int o = 16; o > 0; o >>= 1)
            for (int r = 0; r < REP; ++r) s[r] += __shfl_xor_sync(0xffffffff, s[r], o);
        for (int r = 0; r < REP; ++r) {
            const float m_new = fmaxf(m[r], s[r]);
            const float c = __expf(m[r] - m_new), p = __expf(s[r] - m_new);
            l[r] = l[r] * c + p;
            for (int i = 0; i < PER_LANE; ++i) acc[r][i] = acc[r][i] * c + p * vj[i];
            m[r] = m_new;
        }
    }

    __shared__ float part_m[WARPS][REP], part_l[WARPS][REP], part_acc[WARPS][REP][D];
    for (int r = 0; r < REP; ++r) {
        if (lane == 0) { part_m[warp][r] = m[r]; part_l[warp][r] = l[r]; }
        for (int i = 0; i < PER_LANE; ++i) part_acc[warp][r][lane * PER_LANE + i] = acc[r][i];
    }
    __syncthreads();
    for (int r = warp; r < REP; r += WARPS) {
        float top = neg_inf;
        for (int w = 0; w < WARPS; ++w) top = fmaxf(top, part_m[w][r]);
        float total = 0.0f, o[PER_LANE];
        for (int i = 0; i < PER_LANE; ++i) o[i] = 0.0f;
        for (int w = 0; w < WARPS; ++w) {
            const float c = part_m[w][r] == neg_inf ? 0.0f : __expf(part_m[w][r] - top);
            total += part_l[w][r] * c;
            for (int i = 0; i < PER_LANE; ++i) o[i] += part_acc[w][r][lane * PER_LANE + i] * c;
        }
        T* op = out + ((b * kv_heads + hk) * REP + r) * D + lane * PER_LANE;
        for (int i = 0; i < PER_LANE; ++i) op[i] = static_cast<T>(total > 0.0f ? o[i] / total : 0.0f);
    }
"""
_kernel: Any = None
_stock: Any = None
_installing = threading.Lock()  # two models' engine threads may load at once


def applies(
    q_shape: tuple[int, ...],
    k_shape: tuple[int, ...],
    v_shape: tuple[int, ...],
    mask_shape: tuple[int, ...] | None,
    *,
    same_dtypes: bool,
    bool_mask: bool,
    has_sinks: bool,
) -> bool:
    """Whether a call is one the kernel serves: one query per row, a boolean (row, 1, 1, keys) mask, K and V of one
    head size, grouped heads, no sinks. Pure, so the rule is tested without a GPU."""
    if has_sinks or not same_dtypes or not bool_mask or mask_shape is None:
        return False
    if len(q_shape) != 4 or len(k_shape) != 4 or k_shape != v_shape:
        return False
    batch, heads, queries, dim = q_shape
    kv_heads, keys = k_shape[1], k_shape[2]
    return (
        queries == 1
        and dim in _HEAD_DIMS
        and k_shape[0] == batch
        and k_shape[3] == dim
        and heads % kv_heads == 0
        and WARPS * (heads // kv_heads) * (dim + 2) * 4 <= SHARED_BYTES  # the warps' partial results
        and mask_shape == (batch, 1, 1, keys)
    )


def masked_decode_attention(q: Any, k: Any, v: Any, *, scale: float, mask: Any) -> Any:
    """softmax(q k^T * scale, masked) v for q of shape (B, H, 1, D); K and V may be strided views of a KV cache."""
    import mlx.core as mx

    global _kernel
    if _kernel is None:
        _kernel = mx.fast.cuda_kernel(
            name="mlx_router_masked_decode_attention",
            input_names=["q", "k", "v", "mask"],
            output_names=["out"],
            source=_SOURCE,
            ensure_row_contiguous=False,  # K and V are slices of the cache's buffers: read in place
        )
    batch, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    scale_bits = struct.unpack("<i", struct.pack("<f", scale))[0]
    return _kernel(
        inputs=[q, k, v, mask],
        template=[("T", q.dtype), ("D", dim), ("REP", heads // kv_heads), ("WARPS", WARPS), ("SCALE_BITS", scale_bits)],
        grid=(batch * kv_heads * WARPS * 32, 1, 1),
        threadgroup=(WARPS * 32, 1, 1),
        output_shapes=[q.shape],
        output_dtypes=[q.dtype],
    )[0]


def _routed(q: Any, k: Any, v: Any, *, scale: float, mask: Any = None, sinks: Any = None, **kwargs: Any) -> Any:
    import mlx.core as mx

    if kwargs:  # a stream of the caller's choosing: MLX's own
        return _stock(q, k, v, scale=scale, mask=mask, sinks=sinks, **kwargs)
    if isinstance(mask, mx.array) and applies(
        tuple(q.shape),
        tuple(k.shape),
        tuple(v.shape),
        tuple(mask.shape),
        same_dtypes=q.dtype == k.dtype == v.dtype,
        bool_mask=mask.dtype == mx.bool_,
        has_sinks=sinks is not None,
    ):
        return masked_decode_attention(q, k, v, scale=scale, mask=mask)
    if takes_unfused(tuple(q.shape), tuple(k.shape), has_sinks=sinks is not None):
        return unfused_attention(q, k, v, scale=scale, mask=mask)
    return _stock(q, k, v, scale=scale, mask=mask, sinks=sinks)


def install() -> bool:
    """Route batched decode attention to the kernel, and short prefill to plain ops, on MLX's CUDA backend;
    idempotent. False where it does not apply (Metal, which has fused kernels of its own for both; the CPU;
    `MLX_ROUTER_STOCK_ATTENTION=1`)."""
    import mlx.core as mx

    global _stock
    with _installing:
        if _stock is not None:
            return True
        if os.environ.get(DISABLE_ENV) == "1" or not mx.cuda.is_available():
            return False
        _stock = mx.fast.scaled_dot_product_attention
        mx.fast.scaled_dot_product_attention = _routed
    logger.info(
        "batched decode attention runs in mlx-router's CUDA kernel, short prefill as plain ops ({}=1: MLX's own)",
        DISABLE_ENV,
    )
    return True
