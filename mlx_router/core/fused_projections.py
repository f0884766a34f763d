"""Fewer matmuls per decode step: the projections a layer applies to one input run as one matmul.

An attention layer of mlx-lm's models projects its input three times (q, k and v) and a gated MLP twice (gate and
up). A decode step on a GPU is bound by the CPU work of launching its ops, not by the matmuls themselves, so after a
model loads, `fuse_projections` concatenates each such group's weights into one projection. The layer's own
code is unchanged: its `q_proj`, `k_proj`, `v_proj` become `_ProjectionPart`s, each returning its slice of the fused
output, computed once per input (the parts are called one after another on the same array). Three matmuls per layer
instead of seven on a Llama (BENCHMARKS.md, session 9, has the measured effect).

Groups are fused only when they are alike: all `nn.Linear` (with or without biases) or all `nn.QuantizedLinear` of
one quantization, over one input size. Anything else keeps mlx-lm's modules.
"""

from __future__ import annotations

import copy
import os
from typing import Any

DISABLE_ENV = "MLX_ROUTER_UNFUSED_PROJECTIONS"  # "1": keep mlx-lm's separate projections
_GROUPS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_QUANTIZATION = ("group_size", "bits", "mode")


class _SharedOutput:
    """The fused projection's output for its last input, kept until every part has taken its slice."""

    def __init__(self, linear: Any, widths: list[int]) -> None:
        self.linear = linear
        self._ends = [sum(widths[: i + 1]) for i in range(len(widths) - 1)]
        self._parts = len(widths)
        self._last: list[Any] | None = None

    def part(self, x: Any, index: int) -> Any:
        import mlx.core as mx

        last = self._last
        if last is None or last[0] is not x:
            last = [x, mx.split(self.linear(x), self._ends, axis=-1), self._parts]
        last[2] -= 1
        self._last = last if last[2] > 0 else None  # so no activations outlive the layer's call
        return last[1][index]


class _ProjectionPart:
    """Stands in for one fused projection: its slice of the shared output. Not an `nn.Module`, so it holds no
    parameters of its own; the fused weights sit once in the model's tree, under the group's new name."""

    def __init__(self, shared: _SharedOutput, index: int) -> None:
        self._shared = shared
        self._index = index

    def __call__(self, x: Any) -> Any:
        return self._shared.part(x, self._index)


def _nn() -> Any:
    import mlx.nn  # its stubs omit the layer classes

    return mlx.nn


def _fuse(linears: list[Any]) -> tuple[Any, list[int]] | None:
    import mlx.core as mx

    nn = _nn()
    kind = type(linears[0])
    if kind not in (nn.Linear, nn.QuantizedLinear) or any(type(p) is not kind for p in linears):
        return None
    if len({p.weight.shape[1] for p in linears}) != 1 or len({"bias" in p for p in linears}) != 1:
        return None
    if kind is nn.QuantizedLinear and len({tuple(getattr(p, a) for a in _QUANTIZATION) for p in linears}) != 1:
        return None
    fused = copy.copy(linears[0])  # keeps the kind and its quantization settings without initialising new weights
    for name in ("weight", "scales", "biases", "bias"):
        if name in linears[0]:
            fused[name] = mx.concatenate([p[name] for p in linears], axis=0)
    return fused, [p.weight.shape[0] for p in linears]


def fuse_projections(model: Any) -> int:
    """Fuse every alike group of projections in `model`'s layers; returns how many groups were fused (0 when
    `MLX_ROUTER_UNFUSED_PROJECTIONS=1`)."""
    import mlx.core as mx

    nn = _nn()
    if os.environ.get(DISABLE_ENV) == "1":
        return 0
    fused_groups = 0
    for _, module in model.named_modules():
        for fused_name, names in _GROUPS.items():
            if not all(isinstance(module.get(n), nn.Module) for n in names):
                continue
            if getattr(module, "is_kv_shared_layer", False):  # Gemma 3n: it calls q_proj alone, k/v would be waste
                continue
            made = _fuse([module[n] for n in names])
            if made is None:
                continue
            linear, widths = made
            mx.eval(linear.parameters())  # now, one group at a time: the old weights go as the new ones arrive
            module[fused_name] = linear
            shared = _SharedOutput(linear, widths)
            for i, n in enumerate(names):
                module[n] = _ProjectionPart(shared, i)
            fused_groups += 1
    return fused_groups
