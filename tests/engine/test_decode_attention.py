"""The CUDA decode-attention kernel (`core/decode_attention.py`): which calls it takes, and, where MLX has its CUDA
backend (the GPU machine; CI has none), that it matches MLX's own attention on the shapes mlx-lm gives it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from conftest import left_padded_logits

from mlx_router.core import decode_attention
from mlx_router.core.decode_attention import applies, masked_decode_attention

CUDA = mx.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="the kernel runs on MLX's CUDA backend only")
STOCK = mx.fast.scaled_dot_product_attention  # MLX's own, whether or not install() ran before this import


def _rule(q: tuple[int, ...], k: tuple[int, ...], mask: tuple[int, ...] | None, **kw: Any) -> bool:
    flags = {"same_dtypes": True, "bool_mask": True, "has_sinks": False, **kw}
    return applies(q, k, k, mask, **flags)


def test_the_kernel_takes_only_batched_decode_steps_with_a_boolean_padding_mask() -> None:
    assert _rule((32, 32, 1, 128), (32, 8, 300, 128), (32, 1, 1, 300))  # mlx-lm's BatchKVCache, grouped heads
    assert _rule((3, 4, 1, 64), (3, 4, 9, 64), (3, 1, 1, 9))
    assert not _rule((32, 32, 7, 128), (32, 8, 300, 128), (32, 1, 7, 300))  # a prefill chunk: MLX's fused kernel
    assert not _rule((1, 32, 1, 128), (1, 8, 300, 128), None)  # a lone sequence: no mask, MLX's fused kernel
    assert not _rule((4, 32, 1, 128), (4, 8, 300, 128), (1, 1, 1, 300))  # a mask for all rows: not padding
    assert not _rule((4, 32, 1, 128), (4, 8, 300, 128), (4, 1, 1, 300), bool_mask=False)  # additive
    assert not _rule((4, 32, 1, 128), (4, 8, 300, 128), (4, 1, 1, 300), has_sinks=True)
    assert not _rule((4, 32, 1, 128), (4, 8, 300, 128), (4, 1, 1, 300), same_dtypes=False)
    assert not _rule((4, 32, 1, 120), (4, 8, 300, 120), (4, 1, 1, 300))  # a head size the lanes do not divide
    assert not _rule((4, 32, 1, 80), (4, 32, 300, 80), (4, 1, 1, 300))  # Phi-2's 80: 2.5 dimensions a lane
    assert not _rule((4, 30, 1, 128), (4, 8, 300, 128), (4, 1, 1, 300))  # heads not a multiple of KV heads
    assert _rule((4, 64, 1, 128), (4, 8, 300, 128), (4, 1, 1, 300))  # 8 query heads a KV head: Llama-3 70B
    assert not _rule((4, 64, 1, 256), (4, 2, 300, 256), (4, 1, 1, 300))  # 32 a KV head: over the shared memory
    assert not applies((4, 32, 1, 128), (4, 8, 300, 128), (4, 8, 300, 64), (4, 1, 1, 300), same_dtypes=True,
                       bool_mask=True, has_sinks=False)  # fmt: skip


@pytest.mark.skipif(CUDA, reason="checks the backends without CUDA")
def test_install_leaves_mlx_alone_without_cuda() -> None:
    assert decode_attention.install() is False
    assert mx.fast.scaled_dot_product_attention is STOCK


def _left_padded(rows: int, keys: int, pads: list[int]) -> mx.array:
    slots = mx.arange(keys)[None, None, None, :]
    return mx.array(pads).reshape(rows, 1, 1, 1) <= slots


@needs_cuda
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize(("rows", "heads", "kv_heads", "dim", "keys"), [
    (32, 32, 8, 128, 300), (5, 4, 4, 64, 7), (1, 8, 2, 128, 1), (3, 16, 2, 96, 1100), (2, 4, 1, 256, 513),
])  # fmt: skip
def test_the_kernel_matches_mlx_on_strided_cache_views(
    dtype: Any, rows: int, heads: int, kv_heads: int, dim: int, keys: int
) -> None:
    mx.random.seed(rows * keys + dim)
    capacity = (keys // 256 + 1) * 256  # BatchKVCache's buffers grow in steps of 256: attention reads a slice
    q = mx.random.normal((rows, heads, 1, dim)).astype(dtype)
    k = mx.random.normal((rows, kv_heads, capacity, dim)).astype(dtype)[..., :keys, :]
    v = mx.random.normal((rows, kv_heads, capacity, dim)).astype(dtype)[..., :keys, :]
    pads = [(i * 37) % keys for i in range(rows)]  # row 0 unpadded, the others padded by up to keys - 1
    mask = _left_padded(rows, keys, pads)
    scale = dim**-0.5
    got = masked_decode_attention(q, k, v, scale=scale, mask=mask)
    want = STOCK(q, k, v, scale=scale, mask=mask)
    tolerance = 1e-4 if dtype == mx.float32 else 2e-2
    assert got.shape == want.shape and got.dtype == want.dtype
    assert mx.allclose(got.astype(mx.float32), want.astype(mx.float32), atol=tolerance, rtol=tolerance).item()


@needs_cuda
def test_install_routes_only_masked_decode_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode_attention, "_stock", None)
    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", STOCK)
    calls: list[str] = []
    real_kernel = decode_attention.masked_decode_attention
    monkeypatch.setattr(decode_attention, "masked_decode_attention", lambda *a, **kw: calls.append("kernel") or
                        real_kernel(*a, **kw))  # fmt: skip
    assert decode_attention.install() and decode_attention.install()  # idempotent
    q, k = mx.zeros((2, 4, 1, 64)), mx.zeros((2, 2, 5, 64))
    mx.fast.scaled_dot_product_attention(q, k, k, scale=1.0, mask=_left_padded(2, 5, [0, 2]))
    mx.fast.scaled_dot_product_attention(q, k, k, scale=1.0, mask=None)
    mx.fast.scaled_dot_product_attention(mx.zeros((2, 4, 3, 64)), k, k, scale=1.0, mask="causal")
    assert calls == ["kernel"]


@needs_cuda
def test_decode_steps_of_a_real_model_match_mlx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bfloat16 Llama with mlx-lm's BatchKVCache and left-padded rows, fed the same tokens: the logits of decode
    steps taken through the kernel match those MLX computes itself, layer after layer."""
    from mlx_lm import load

    from helper_tools.tiny_models import build_random_model

    path = build_random_model(tmp_path / "m", hidden_size=256, num_heads=4, num_kv_heads=2, dtype="bfloat16")
    model = load(str(path))[0]
    calls = []
    real_kernel = decode_attention.masked_decode_attention
    monkeypatch.setattr(decode_attention, "masked_decode_attention", lambda *a, **kw: calls.append(1) or
                        real_kernel(*a, **kw))  # fmt: skip
    monkeypatch.setattr(decode_attention, "_stock", STOCK)

    stock = left_padded_logits(model, monkeypatch, STOCK, split=20, steps=5)
    routed = left_padded_logits(model, monkeypatch, decode_attention._routed, split=20, steps=5)
    assert len(calls) == 5 * len(model.layers)
    for a, b in zip(stock, routed, strict=True):
        assert mx.allclose(a, b, atol=0.1, rtol=0.05).item()
