"""Per-request samplers for the batch engine, built on mlx-lm's sampling helpers."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, greedy_sampler

from .types import SamplingParams

Sampler = Callable[[Any], Any]


def make_sampler(params: SamplingParams) -> Sampler:
    """A sampler for one request.

    Greedy requests share mlx-lm's `greedy_sampler` object, so a batch of them samples in one call. Every
    stochastic request gets its own PRNG key (from `seed`, else fresh entropy), so its tokens do not depend on
    which other requests share the batch.
    """
    if params.temperature <= 0:
        return greedy_sampler
    seed = params.seed if params.seed is not None else secrets.randbits(32)
    key = mx.random.key(seed)
    inv_temp = 1.0 / params.temperature

    def sample(logprobs: Any) -> Any:
        nonlocal key
        key, subkey = mx.random.split(key)
        if 0.0 < params.top_p < 1.0:
            logprobs = apply_top_p(logprobs, params.top_p)
        if params.min_p > 0.0:
            logprobs = apply_min_p(logprobs, params.min_p)
        if params.top_k > 0:
            logprobs = apply_top_k(logprobs, params.top_k)
        return mx.random.categorical(logprobs * inv_temp, key=subkey)

    return sample


def make_logits_processors(params: SamplingParams) -> list[Any]:
    """mlx-lm's penalty and bias processors for the fields the request set (none: the fast path)."""
    from mlx_lm.sample_utils import make_logits_processors as mlx_lm_processors

    return list(
        mlx_lm_processors(
            logit_bias=dict(params.logit_bias) or None,
            repetition_penalty=params.repetition_penalty,
            presence_penalty=params.presence_penalty or None,
            frequency_penalty=params.frequency_penalty or None,
        )
    )
