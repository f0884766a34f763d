"""Decode a request that runs alone without mlx-lm's BatchGenerator, the way `generate_step` does.

BatchGenerator pays for batching even at batch size 1 (a batched KV cache with masks, per-row splits), so the
engine decodes a lone request here: a plain KV cache and one step of look-ahead (the next token is queued before
the current one is read). It moves into a BatchGenerator when a second request arrives (`to_batch`) and back out
when it is alone again (`from_batch`), without losing or repeating a token. Runs on the engine thread only.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import TokenBuffer, make_prompt_cache

# One decoded token: (token id, its 1-D log-probabilities, "stop" | "length" | None), as BatchGenerator reports it.
Step = tuple[int, Any, str | None]


class SoloStream:
    """One sequence: prefill in chunks, then one token per `advance()` with the next one already queued."""

    def __init__(
        self,
        gen: Any,
        *,
        cache: list[Any] | None,
        tokens: list[int],
        rest: list[int],
        max_tokens: int,
        sampler: Any,
        logits_processors: list[Any],
        stop_tokens: Collection[int],
        generated: int = 0,
    ) -> None:
        """`gen` is the BatchGenerator this sequence would join: its model, stream and prefill chunk size are used."""
        self._model = gen.model
        self._stream = gen.stream
        self._prefill_step_size = gen.prefill_step_size
        self.cache = cache if cache is not None else make_prompt_cache(gen.model)
        self.tokens = tokens  # the tokens whose keys and values `cache` holds (or will, once queued work runs)
        self._rest = rest  # prompt tokens not yet fed; the last one is fed with the first sampling step
        self.max_tokens = max_tokens  # the request's whole budget; `generated` counts against it
        self.generated = generated
        self._sampler = sampler
        self._processors = logits_processors
        self._stop_tokens = stop_tokens
        self._context: Any = None  # token history for the logits processors, built on first use
        self._pending: tuple[Any, Any] | None = None  # the sampled, not yet read, next token and its logprobs

    @classmethod
    def from_batch(cls, gen: Any, uid: int, **kwargs: Any) -> SoloStream | None:
        """Take sequence `uid` out of `gen` when it is the only one there and already decoding, else None.

        Reads BatchGenerator internals (mlx-lm 0.32): the token it has sampled but not yet reported must move too.
        """
        batch = gen._generation_batch
        if gen._unprocessed_sequences or len(gen._prompt_batch) or batch.uids != [uid]:
            return None
        with mx.stream(gen.stream):
            cache = batch.extract_cache(0)
            solo = cls(gen, cache=cache, tokens=list(batch.tokens[0]), rest=[], **kwargs)
            solo._pending = (batch._next_tokens[0:1], batch._next_logprobs[0])
        gen.remove([uid])
        return solo

    @property
    def decoding(self) -> bool:
        return self._pending is not None

    def advance(self) -> Step | None:
        """One unit of work: a prefill chunk (returns None) or one decoded token."""
        with mx.stream(self._stream):
            if self._pending is None:
                self._prefill()
                return None
            return self._decode(look_ahead=self.generated + 1 < self.max_tokens)

    def take_pending(self) -> Step:
        """The token already sampled, without queueing another: the cache then lacks it, ready for `to_batch`."""
        with mx.stream(self._stream):
            return self._decode(look_ahead=False)

    def saved(self) -> tuple[list[int], list[Any]]:
        """The tokens and KV cache to keep for later prompts, once finished (for `PrefixCache.keep`)."""
        return self.tokens, self.cache

    def to_batch(self, gen: Any, last_token: int | None) -> int:
        """Insert this sequence into `gen` (after `take_pending` gave `last_token` when decoding) and run `gen` until
        the sequence is decoding there; returns its uid. `gen` must be idle.

        Settling it first keeps it out of the prompt batch of the requests that arrive with it: there its KV cache
        would be merged with theirs, left-padding every new prompt to its length (on an H100, 7 prompts of 2,048
        tokens joined by a moved 2,048-token sequence took 8 s to their first token instead of 0.8 s).
        """
        prompt = self._rest if last_token is None else [last_token]
        (uid,) = gen.insert(
            [prompt],
            max_tokens=[self.max_tokens - self.generated],
            caches=[self.cache],
            all_tokens=[self.tokens],
            samplers=[self._sampler],
            logits_processors=[self._processors],
        )
        while uid not in gen._generation_batch.uids:  # mlx-lm 0.32 internals, as in `from_batch`
            _, decoded = gen.next()
            if decoded:  # only this sequence is in `gen`, and it decodes only once it is settled
                raise RuntimeError("the batch decoded while a sequence moved in")
        return int(uid)

    def _prefill(self) -> None:
        rest = self._rest
        if len(rest) > 1:
            n = min(self._prefill_step_size, len(rest) - 1)
            self._model(mx.array(rest[:n])[None], cache=self.cache)
            mx.eval([c.state for c in self.cache])
            mx.clear_cache()
            self.tokens.extend(rest[:n])
            self._rest = rest = rest[n:]
        if len(rest) == 1:
            self._pending = self._forward(mx.array(rest))
            self.tokens.append(rest[0])
            self._rest = []

    def _decode(self, *, look_ahead: bool) -> Step:
        assert self._pending is not None
        y, logprobs = self._pending
        self._pending = self._forward(y) if look_ahead else None
        token = int(y.item())
        if look_ahead:
            self.tokens.append(token)
        self.generated += 1
        finish = "length" if self.generated >= self.max_tokens else None
        if token in self._stop_tokens:
            finish = "stop"
        if self.generated % 256 == 0:
            mx.clear_cache()
        return token, logprobs, finish

    def _forward(self, y: Any) -> tuple[Any, Any]:
        """Queue the model on token `y` (shape (1,)) and the sampling of the next token; nothing waits here."""
        logits = self._model(y[None], cache=self.cache)[:, -1, :]
        context = None
        if self._processors:
            if self._context is None:
                self._context = TokenBuffer(self.tokens)  # type: ignore[no-untyped-call]
            context = self._context.update_and_fetch(y)
            for processor in self._processors:
                logits = processor(context, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        sampled = self._sampler(logprobs)
        mx.async_eval(sampled, logprobs, context)  # type: ignore[no-untyped-call]
        return sampled, logprobs.squeeze(0)
