"""The one internal request type and the typed events a generation yields.

The core speaks only these dataclasses; each wire dialect converts to and from them in `api/<dialect>/convert.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "tool_calls", "cancelled"]


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A function call made by the assistant; `arguments` is a JSON string, as on the wire."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class Message:
    """One chat turn with its content flattened to text (images arrive with the vision issue)."""

    role: Role
    content: str | None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Resolved sampling settings: request values over per-model config over defaults."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class OutputConstraint:
    """What the output must be, enforced token by token: a call to one of `tool_names`, else JSON of `json_schema`."""

    json_schema: dict[str, Any] | None = None
    tool_names: tuple[str, ...] = ()
    parallel_calls: bool = True


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """What every dialect's request becomes before it reaches the manager."""

    request_id: str
    model: str
    messages: tuple[Message, ...]
    sampling: SamplingParams
    tools: tuple[dict[str, Any], ...] = ()
    tool_choice: str | dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    # Explicit max_tokens from the client; when None the engine may apply the model's configured limit.
    max_tokens_requested: int | None = None
    constraint: OutputConstraint | None = None


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token: str
    logprob: float
    bytes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """Log-probability of one sampled token, with the most likely alternatives when asked for."""

    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Started:
    """First event of every generation: the prompt was accepted (fits the context) and queued."""

    prompt_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A fragment of tool call `index`; `id` and `name` come only with its first fragment."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True, slots=True)
class Done:
    finish_reason: FinishReason
    usage: Usage


@dataclass(frozen=True, slots=True)
class Failed:
    """The generation ended with an error; `error` is a RouterError."""

    error: Exception


Event = Started | TextDelta | ReasoningDelta | ToolCallDelta | Done | Failed


class ModelState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    UNLOADED = "unloaded"


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """One row of the manager's immutable status snapshot."""

    id: str
    state: ModelState
    active_requests: int
    memory_bytes: int
    loaded_at: float | None
    last_used: float | None
    pinned: bool = False
