"""Fused projections (`core/fused_projections.py`): a model computes the same logits with q/k/v and gate/up each
run as one matmul, float or quantized, and groups that are not alike keep mlx-lm's modules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from helper_tools.tiny_models import build_random_model
from mlx_router.core.fused_projections import DISABLE_ENV, fuse_projections


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_model(tmp_path_factory.mktemp("fused") / "m", hidden_size=128, num_heads=4, num_kv_heads=2)


def _load(path: Path, quantized: bool = False) -> Any:
    from mlx_lm import load

    model = load(str(path))[0]
    if quantized:
        nn.quantize(model, group_size=64, bits=4)
    return model


def _prefill_then_decode(model: Any) -> list[mx.array]:
    """Logits of a left-padded batch's prefill and three decode steps, through mlx-lm's BatchKVCache."""
    from mlx_lm.models.cache import BatchKVCache

    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    cache = [BatchKVCache([0, 3]) for _ in model.layers]
    out = [model(mx.array([prompts[0], [0, 0, 0, *prompts[1]]]), cache=cache)]
    out += [model(mx.array([[20 + s], [30 + s]]), cache=cache) for s in range(3)]
    mx.eval(out)
    return out


@pytest.mark.parametrize("quantized", [False, True])
def test_fused_projections_compute_the_same_logits(model_path: Path, quantized: bool) -> None:
    stock, fused = _load(model_path, quantized), _load(model_path, quantized)
    layers = len(fused.layers)
    assert fuse_projections(fused) == 2 * layers  # q/k/v and gate/up in every layer
    attn, mlp = fused.layers[0].self_attn, fused.layers[0].mlp
    assert "qkv_proj" in attn and "gate_up_proj" in mlp
    assert type(attn.qkv_proj) is (nn.QuantizedLinear if quantized else nn.Linear)
    for want, got in zip(_prefill_then_decode(stock), _prefill_then_decode(fused), strict=True):
        assert mx.array_equal(want, got).item()
    # The same weights, held once: the parts stand in for the old modules without weights of their own.
    sizes = [sum(v.size for _, v in tree_flatten(m.parameters())) for m in (stock, fused)]
    assert sizes[0] == sizes[1]


def test_groups_that_are_not_alike_keep_mlx_lms_modules(model_path: Path) -> None:
    model = _load(model_path)
    mlp = model.layers[0].mlp
    mlp.up_proj = nn.QuantizedLinear.from_linear(mlp.up_proj, group_size=64, bits=4)  # gate float, up quantized
    stock_up = mlp.up_proj
    assert fuse_projections(model) == 2 * len(model.layers) - 1
    assert model.layers[0].mlp.up_proj is stock_up and "gate_up_proj" not in model.layers[0].mlp


def test_fusion_can_be_turned_off(model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DISABLE_ENV, "1")
    model = _load(model_path)
    assert fuse_projections(model) == 0
    assert type(model.layers[0].self_attn.q_proj) is nn.Linear


def test_attention_that_shares_another_layers_kv_is_left_alone(model_path: Path) -> None:
    # Gemma 3n's KV-shared layers call q_proj alone: fused, each call would compute k and v for nothing.
    model = _load(model_path)
    model.layers[0].self_attn.is_kv_shared_layer = True
    assert fuse_projections(model) == 2 * len(model.layers) - 1
    assert type(model.layers[0].self_attn.q_proj) is nn.Linear
