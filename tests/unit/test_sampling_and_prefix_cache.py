"""The engine thread's sampler pool and prefix cache, without a model."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache
from mlx_lm.sample_utils import greedy_sampler

from mlx_router.core.prefix_cache import MIN_PREFIX_REUSE, PrefixCache
from mlx_router.core.sampling import SamplerPool
from mlx_router.core.types import SamplingParams


def params(**kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=8, **kw)


def test_unseeded_requests_with_the_same_settings_share_one_sampler() -> None:
    # BatchGenerator samples a batch in one call only when every row has the same sampler object.
    pool = SamplerPool()
    a, b = pool.get(params(temperature=0.7)), pool.get(params(temperature=0.7))
    assert a is b
    assert pool.get(params(temperature=0.7, top_p=0.9)) is not a
    assert pool.get(params(temperature=0.0)) is greedy_sampler
    assert pool.get(params(temperature=0.7, seed=1)) is not pool.get(params(temperature=0.7, seed=1))


def test_a_seeded_sampler_gives_the_same_tokens_whatever_else_was_sampled() -> None:
    pool = SamplerPool()
    logprobs = mx.log(mx.softmax(mx.random.normal((1, 50), key=mx.random.key(3)), axis=-1))
    first = [pool.get(params(temperature=1.0, seed=7)) for _ in range(2)]
    shared = pool.get(params(temperature=1.0))
    runs = []
    for sampler in first:
        tokens = []
        for _ in range(20):
            shared(logprobs)  # other requests' sampling must not move this request's key
            tokens.append(sampler(logprobs).item())
        runs.append(tokens)
    assert runs[0] == runs[1] and len(set(runs[0])) > 1


def test_a_seeded_draw_is_the_key_split_and_categorical_draw_at_any_batch_size() -> None:
    # The draw is compiled (fewer kernels per decode step, once per batch shape): it must stay the plain draw, with
    # the key carried from one call to the next.
    normal = mx.random.normal((3, 50), key=mx.random.key(4))
    rows = [mx.log(mx.softmax(normal[:n], axis=-1)) for n in (1, 3, 1, 3, 2)]
    for temperature in (0.5, 0.8):  # the temperature is an input of the compiled draw, not a constant baked into it
        sampler = SamplerPool().get(params(temperature=temperature, seed=11))
        key, expected = mx.random.key(11), []
        for logprobs in rows:
            key, subkey = mx.random.split(key)
            expected.append(mx.random.categorical(logprobs * (1 / temperature), key=subkey).tolist())
        assert [sampler(logprobs).tolist() for logprobs in rows] == expected


def test_a_shared_sampler_samples_each_row_of_a_batch() -> None:
    pool = SamplerPool()
    logprobs = mx.full((3, 10), -1e9)
    for row, token in enumerate((2, 5, 7)):
        logprobs[row, token] = 0.0
    assert pool.get(params(temperature=1.0, top_p=0.5, top_k=3))(logprobs).tolist() == [2, 5, 7]


def test_the_pool_forgets_the_oldest_settings_beyond_its_bound() -> None:
    pool = SamplerPool()
    first = pool.get(params(temperature=0.1))
    for i in range(SamplerPool.MAX_SHARED):
        pool.get(params(temperature=0.2 + i / 100))
    assert pool.get(params(temperature=0.1)) is not first  # a request keeps its own reference meanwhile


def kv(tokens: int) -> list[Any]:
    layer = KVCache()
    keys = mx.zeros((1, 2, tokens, 4))
    layer.update_and_fetch(keys, keys)
    return [layer]


def test_a_prefix_cache_hit_must_cover_enough_of_the_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = PrefixCache(max_size=8)
    stored = list(range(200))
    cache.keep("m", stored, kv(200))
    copies = []
    fetch = PrefixCache.fetch_nearest_cache
    monkeypatch.setattr(PrefixCache, "fetch_nearest_cache", lambda s, *a: copies.append(1) or fetch(s, *a))

    # Sharing only a short head (a chat template's opening): no lookup copy at all, the whole prompt is prefilled.
    short_head = [*range(10), *range(1000, 1200)]
    assert cache.nearest("m", short_head) == (None, short_head)
    assert copies == []

    # A long shared prefix is reused; the rest is prefilled.
    longer = [*range(150), *range(2000, 2050)]
    entry, rest = cache.nearest("m", longer)
    assert entry is not None and rest == longer[150:] and entry[0].offset == 150

    # The exact prompt again: all but its last token come from the cache (one token must be fed).
    entry, rest = cache.nearest("m", stored)
    assert entry is not None and rest == [199] and entry[0].offset == 199

    # Another model's entries never match; a short prompt may reuse half of itself.
    assert cache.nearest("other", stored) == (None, stored)
    assert MIN_PREFIX_REUSE > 40
    assert cache.nearest("m", list(range(40)))[1] == [39]


def test_a_kept_entry_is_cut_to_its_length_and_counted() -> None:
    cache = PrefixCache(max_size=8)
    layers = kv(100)  # a KV cache allocates in steps of 256 positions
    assert layers[0].keys.shape[2] == 256
    cache.keep("m", list(range(100)), layers)
    assert layers[0].keys.shape[2] == 100
    assert cache.nbytes == 2 * 100 * 2 * 4 * 4  # keys and values, float32


def test_samplers_leave_mlx_global_random_state_alone() -> None:
    # Each model's engine thread samples on its own: a draw on the process-wide state would make the threads share
    # one lazy array.
    before = mx.random.state[0].tolist()
    logprobs = mx.log(mx.softmax(mx.random.normal((4, 50), key=mx.random.key(5)), axis=-1))
    pool = SamplerPool()
    for p in (params(temperature=0.8), params(temperature=0.8, seed=3), params(temperature=0.8, top_p=0.9)):
        mx.eval(pool.get(p)(logprobs))
    assert mx.random.state[0].tolist() == before  # a draw on it would have moved it on
