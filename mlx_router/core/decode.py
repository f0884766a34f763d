"""Per-request token → text decoding on the engine thread: detokenizer, stop strings, logprobs, usage."""

from __future__ import annotations

from typing import Any

from .parsing import StreamParser
from .sampling import Sampler, make_logits_processors
from .stops import StopStringFilter
from .types import Event, FinishReason, SamplingParams, TextDelta, TokenLogprob, TopLogprob, Usage


class RequestDecoder:
    """Turns one request's sampled tokens into events (text, reasoning, tool calls) and decides when it ends."""

    def __init__(
        self,
        tokenizer: Any,
        sampling: SamplingParams,
        parser: StreamParser,
        *,
        sampler: Sampler,
        prompt_tokens: int,
        constraint: Any = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._detokenizer = tokenizer.detokenizer
        self._sampling = sampling
        self._parser = parser
        self._pending_logprobs: list[TokenLogprob] = []
        self._stops = StopStringFilter(sampling.stop)
        self.sampler = sampler
        # The grammar mask goes last, so no bias or penalty can lift a token it forbids.
        self.logits_processors = make_logits_processors(sampling) + ([constraint] if constraint else [])
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = 0
        self.completion_tokens = 0

    def step(self, token: int, logprobs: Any, model_finish: str | None) -> tuple[list[Event], FinishReason | None]:
        """Consume one sampled token. `model_finish` is BatchGenerator's reason ("stop" = an EOS token)."""
        self.completion_tokens += 1
        if model_finish != "stop":  # the EOS token itself is never shown
            self._detokenizer.add_token(token)
        if model_finish is not None:
            self._detokenizer.finalize()
        text = self._stops.feed(self._detokenizer.last_segment)
        finish: FinishReason | None = None
        if self._stops.stopped:
            finish = "stop"
        elif model_finish is not None:
            text += self._stops.flush()
            finish = "length" if model_finish == "length" else "stop"
        if self._sampling.logprobs and model_finish != "stop":
            self._pending_logprobs.append(self._logprob(token, logprobs))
        events = self._parser.feed(text) if text else []
        if finish is not None:
            events += self._parser.finish()
            if finish == "stop" and self._parser.saw_tool_calls:  # cut off by max_tokens stays "length"
                finish = "tool_calls"
        return self._attach_logprobs(events), finish

    def _attach_logprobs(self, events: list[Event]) -> list[Event]:
        # Log-probabilities ride on the next content delta; tokens of reasoning or tool markup wait for one.
        if not self._pending_logprobs:
            return events
        for i, event in enumerate(events):
            if isinstance(event, TextDelta):
                events[i] = TextDelta(event.text, tuple(self._pending_logprobs))
                self._pending_logprobs = []
                break
        return events

    def usage(self) -> Usage:
        return Usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens)

    def _logprob(self, token: int, logprobs: Any) -> TokenLogprob:
        import mlx.core as mx

        top: tuple[TopLogprob, ...] = ()
        n = self._sampling.top_logprobs
        if n > 0:
            ids = mx.argpartition(-logprobs, kth=n - 1)[:n]
            pairs: list[tuple[int, float]] = sorted(
                zip(ids.tolist(), logprobs[ids].tolist(), strict=True),  # type: ignore[arg-type]
                key=lambda p: -p[1],
            )
            top = tuple(TopLogprob(t, lp, _utf8(t)) for t, lp in ((self._text(i), lp) for i, lp in pairs))
        text = self._text(token)
        return TokenLogprob(text, float(logprobs[token].item()), _utf8(text), top)

    def _text(self, token: int) -> str:
        return str(self._tokenizer.decode([token]))


def _utf8(text: str) -> tuple[int, ...]:
    return tuple(text.encode("utf-8"))
