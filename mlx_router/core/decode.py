"""Per-request token → text decoding on the engine thread: detokenizer, stop strings, logprobs, usage."""

from __future__ import annotations

from typing import Any

from .sampling import make_logits_processors, make_sampler
from .stops import StopStringFilter
from .types import FinishReason, SamplingParams, TextDelta, TokenLogprob, TopLogprob, Usage


class RequestDecoder:
    """Turns one request's sampled tokens into TextDeltas and decides when it is finished."""

    def __init__(self, tokenizer: Any, sampling: SamplingParams, *, prompt_tokens: int) -> None:
        self._tokenizer = tokenizer
        self._detokenizer = tokenizer.detokenizer
        self._sampling = sampling
        self._stops = StopStringFilter(sampling.stop)
        self.sampler = make_sampler(sampling)
        self.logits_processors = make_logits_processors(sampling)
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = 0
        self.completion_tokens = 0

    def step(self, token: int, logprobs: Any, model_finish: str | None) -> tuple[TextDelta | None, FinishReason | None]:
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
        lps = (self._logprob(token, logprobs),) if self._sampling.logprobs and model_finish != "stop" else ()
        delta = TextDelta(text, lps) if text or lps else None
        return delta, finish

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
            top = tuple(TopLogprob(self._text(i), lp, _utf8(self._text(i))) for i, lp in pairs)
        text = self._text(token)
        return TokenLogprob(text, float(logprobs[token].item()), _utf8(text), top)

    def _text(self, token: int) -> str:
        return str(self._tokenizer.decode([token]))


def _utf8(text: str) -> tuple[int, ...]:
    return tuple(text.encode("utf-8"))
