"""The prefix KV cache of one engine: mlx-lm's LRU prompt cache, with entries that own their memory and lookups
that copy an entry only when it will be reused. Runs on the engine thread only."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache, LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

# A shared prefix shorter than this (and than half the prompt) is prefilled again instead: a few dozen tokens cost
# about one decode step, less than adapting a cached entry to them. On CUDA a short hit also gave the KV cache a new
# shape, and compiling kernels for it added 50-200 ms to that request's first token (measured on an H100).
MIN_PREFIX_REUSE = 64


class PrefixCache(LRUPromptCache):
    """Entries keyed by model id and token ids, evicted least recently used within a byte budget."""

    def nearest(self, model: str, prompt: list[int]) -> tuple[list[Any] | None, list[int]]:
        """A copy of the longest cached prefix of `prompt` worth reusing, and the tokens still to prefill (never
        none: one must be fed)."""
        worth = min(MIN_PREFIX_REUSE, len(prompt) // 2)
        if self._reusable(model, prompt) < worth:
            return None, prompt
        kv, rest = self.fetch_nearest_cache(model, prompt)
        if kv is None or len(prompt) - len(rest) < worth:
            return None, prompt
        if not rest:
            if not can_trim_prompt_cache(kv):
                return None, prompt
            trim_prompt_cache(kv, 1)
            rest = prompt[-1:]
        return kv, list(rest)

    def keep(self, model: str, tokens: list[int], cache: list[Any]) -> None:
        """Keep a finished sequence's KV cache for later prompts that start with `tokens`."""
        self.insert_cache(model, tokens, own_kv(cache))

    def _reusable(self, model: str, prompt: list[int]) -> int:
        # The tokens `prompt` shares with any entry, by walking the trie: an upper bound on what a lookup could
        # reuse. `fetch_nearest_cache` searches every entry below the shared part and deep-copies the one it picks
        # (megabytes per layer); most prompts share only the chat template's opening with the cache, and that work
        # (1.3 ms per request with 256 short entries, more with long ones) would be thrown away.
        # `_trie._trie` is mlx-lm 0.32's nested dicts keyed by token (pinned by
        # tests/unit/test_sampling_and_prefix_cache.py).
        node = self._trie._trie.get(model)
        n = 0
        while node is not None and n < len(prompt) and prompt[n] in node:
            node, n = node[prompt[n]], n + 1
        return n


def own_kv(cache: list[Any]) -> list[Any]:
    """`cache` with each plain KV layer cut to its length and copied into arrays of its own.

    Plain KV caches grow in steps of 256 positions, and a row taken out of a batch is a view of the whole batch's
    buffer: kept as they are, an entry would pin far more memory than the byte budget counts (on an H100, enough to
    run out of memory at 128 concurrent requests). `mx.contiguous` of the slice makes the copy.
    """
    copies = []
    for c in cache:
        keys, values = getattr(c, "keys", None), getattr(c, "values", None)
        if type(c) is KVCache and keys is not None and values is not None:  # not subclasses: they keep other state
            n = c.offset
            c.keys, c.values = mx.contiguous(keys[..., :n, :]), mx.contiguous(values[..., :n, :])
            copies += [c.keys, c.values]
    mx.async_eval(copies)  # type: ignore[no-untyped-call]
    return cache
