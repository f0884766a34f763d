"""Prefill attention as plain ops (`core/prefill_attention.py`): which calls take it, and that it computes what MLX's
own attention does on every backend (the ops run on the CPU too, so CI checks them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from conftest import left_padded_logits

from mlx_router.core import decode_attention
from mlx_router.core.prefill_attention import MAX_SCORES, takes_unfused, unfused_attention

STOCK = mx.fast.scaled_dot_product_attention  # MLX's own, whether or not install() ran before this import


def test_short_prefill_calls_take_the_ops_and_long_ones_keep_mlx() -> None:
    assert takes_unfused((32, 32, 128, 128), (32, 8, 128, 128), has_sinks=False)  # a burst of short prompts
    assert takes_unfused((1, 32, 300, 128), (1, 8, 300, 128), has_sinks=False)
    assert takes_unfused((1, 32, 700, 128), (1, 8, 4796, 128), has_sinks=False)  # a long prompt's last chunk
    assert takes_unfused((4, 32, 1024, 128), (4, 8, 1024, 128), has_sinks=False)  # exactly MAX_SCORES
    assert MAX_SCORES == 4 * 32 * 1024 * 1024
    assert not takes_unfused((8, 32, 2047, 128), (8, 8, 2047, 128), has_sinks=False)  # cuDNN's fused kernel
    assert not takes_unfused((1, 32, 2048, 128), (1, 8, 6144, 128), has_sinks=False)
    assert not takes_unfused((32, 32, 1, 128), (32, 8, 300, 128), has_sinks=False)  # a decode step
    assert not takes_unfused((1, 32, 9, 128), (1, 8, 5, 128), has_sinks=False)  # more queries than keys
    assert not takes_unfused((1, 32, 9, 128), (1, 8, 9, 128), has_sinks=True)
    assert not takes_unfused((32, 9, 128), (8, 9, 128), has_sinks=False)


def _qkv(rows: int, heads: int, kv_heads: int, queries: int, keys: int, dtype: Any = mx.float32) -> list[mx.array]:
    mx.random.seed(rows * 1000 + queries * 10 + keys)
    shapes = [(rows, heads, queries, 64), (rows, kv_heads, keys, 64), (rows, kv_heads, keys, 64)]
    return [mx.random.normal(s).astype(dtype) for s in shapes]


def _left_padded(rows: int, queries: int, keys: int) -> mx.array:
    """mlx-lm's BatchKVCache mask: causal, aligned at the end, and row r's first 2r keys are padding."""
    causal = mx.arange(queries)[:, None] + (keys - queries) >= mx.arange(keys)[None]
    pads = mx.array([2 * r for r in range(rows)]).reshape(rows, 1, 1, 1)
    return causal & (pads <= mx.arange(keys))


@pytest.mark.parametrize(("rows", "heads", "kv_heads", "queries", "keys"), [
    (1, 4, 4, 9, 9), (3, 8, 2, 7, 7), (2, 8, 1, 5, 13), (4, 4, 2, 6, 30),
])  # fmt: skip
@pytest.mark.parametrize("kind", ["causal", "none", "bool", "bool_per_head", "additive", "two_dims"])
def test_the_ops_match_mlx_attention(rows: int, heads: int, kv_heads: int, queries: int, keys: int, kind: str) -> None:
    q, k, v = _qkv(rows, heads, kv_heads, queries, keys)
    padded = _left_padded(rows, queries, keys)
    mask: Any = {
        "causal": "causal",
        "none": None,
        "bool": padded,
        "bool_per_head": mx.broadcast_to(padded, (rows, heads, queries, keys)) & (mx.random.uniform(
            shape=(rows, heads, queries, keys)) > 0.3),
        "additive": mx.random.normal((rows, 1, queries, keys)),
        "two_dims": padded[0, 0],
    }[kind]  # fmt: skip
    want = STOCK(q, k, v, scale=0.125, mask=mask)
    got = unfused_attention(q, k, v, scale=0.125, mask=mask)
    assert got.shape == want.shape == q.shape
    assert mx.allclose(got, want, atol=1e-4, rtol=1e-4).item()


def test_a_query_that_sees_no_key_stays_finite() -> None:
    """Left padding masks every key of a padded row's first queries; NaN there would reach every row through V."""
    q, k, v = _qkv(2, 4, 2, 6, 6, mx.bfloat16)
    mask = _left_padded(2, 6, 6)  # row 1: its first two queries see nothing
    got = unfused_attention(q, k, v, scale=0.125, mask=mask)
    assert mx.all(mx.isfinite(got)).item()
    want = STOCK(q, k, v, scale=0.125, mask=mask)
    sees = mx.any(mask, axis=-1, keepdims=True)  # elsewhere MLX's backends differ: the CPU averages V, cuDNN does not
    assert not mx.all(sees).item()
    assert mx.allclose(mx.where(sees, got, 0).astype(mx.float32), mx.where(sees, want, 0).astype(mx.float32),
                       atol=0.05).item()  # fmt: skip


def test_the_output_keeps_the_type_of_the_queries() -> None:
    q, k, v = _qkv(2, 4, 2, 5, 7, mx.bfloat16)
    additive = mx.random.normal((2, 1, 5, 7))  # float32
    got = unfused_attention(q, k, v, scale=0.125, mask=additive)
    assert got.dtype == mx.bfloat16
    want = STOCK(q, k, v, scale=0.125, mask=additive.astype(mx.bfloat16))
    assert mx.allclose(got.astype(mx.float32), want.astype(mx.float32), atol=0.05).item()


@pytest.mark.parametrize("mask", ["causal", None])
def test_values_may_have_a_head_size_of_their_own(mask: Any) -> None:
    """DeepSeek-V2 and MiniCPM3 attend with queries and keys of 192 dimensions and values of 128."""
    q, k, _ = _qkv(2, 8, 2, 5, 9)
    v = mx.random.normal((2, 2, 9, 32))
    got = unfused_attention(q, k, v, scale=0.125, mask=mask)
    assert got.shape == (2, 8, 5, 32)
    assert mx.allclose(got, STOCK(q, k, v, scale=0.125, mask=mask), atol=1e-4, rtol=1e-4).item()


def test_an_unknown_mask_name_is_refused() -> None:
    q, k, v = _qkv(1, 2, 2, 3, 3)
    with pytest.raises(ValueError, match="unknown attention mask"):
        unfused_attention(q, k, v, scale=0.1, mask="sliding")


def test_a_model_prefilled_through_the_routing_computes_what_mlx_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Llama with mlx-lm's BatchKVCache and left-padded rows, prefilled in two chunks (the second sees the first's
    keys) and stepped twice, routed as on CUDA: its prefill runs the ops, and the logits match MLX's own."""
    from mlx_lm import load

    from helper_tools.tiny_models import build_random_model

    path = build_random_model(tmp_path / "m", hidden_size=256, num_heads=4, num_kv_heads=2)
    model = load(str(path))[0]
    calls: list[tuple[int, ...]] = []
    monkeypatch.setattr(decode_attention, "_stock", STOCK)

    def counted(q: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        calls.append(tuple(q.shape))
        return unfused_attention(q, *args, **kwargs)

    monkeypatch.setattr(decode_attention, "unfused_attention", counted)
    monkeypatch.setattr(decode_attention, "masked_decode_attention", lambda *a, **kw: STOCK(*a, **kw))  # CUDA only

    stock = left_padded_logits(model, monkeypatch, STOCK, split=20, steps=2)
    routed = left_padded_logits(model, monkeypatch, decode_attention._routed, split=20, steps=2)
    assert calls == [(4, 4, 20, 64)] * len(model.layers) + [(4, 4, 36 - 20, 64)] * len(model.layers)
    for a, b in zip(stock, routed, strict=True):
        assert mx.allclose(a, b, atol=1e-4, rtol=1e-4).item()
