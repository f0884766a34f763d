"""Pure converters: OpenAI wire request → GenerationRequest, and Events → OpenAI responses and chunks."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from typing import Any

from ...config.settings import DefaultsConfig, ModelConfig
from ...core.constrained import check_constraint
from ...core.errors import InvalidRequest, UnsupportedParameter
from ...core.types import (
    FinishReason,
    GenerationRequest,
    Message,
    OutputConstraint,
    ReasoningDelta,
    SamplingParams,
    TextDelta,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from .schemas import ChatCompletionRequest, ChatMessage

KNOWN_FIELDS = frozenset(ChatCompletionRequest.model_fields)


def to_generation_request(
    body: ChatCompletionRequest,
    *,
    request_id: str,
    model_id: str,
    defaults: DefaultsConfig,
    model_cfg: ModelConfig | None,
) -> GenerationRequest:
    """Validate what Pydantic cannot and resolve sampling: request, then model config, then defaults."""
    _reject_unsupported(body, defaults, model_cfg)
    requested = body.max_completion_tokens or body.max_tokens
    cfg = model_cfg
    sampling = SamplingParams(
        max_tokens=requested or (cfg.max_tokens if cfg and cfg.max_tokens else defaults.max_tokens),
        temperature=_pick(body.temperature, cfg.temp if cfg else None, 0.0),
        top_p=_pick(body.top_p, cfg.top_p if cfg else None, 1.0),
        top_k=_pick(body.top_k, cfg.top_k if cfg else None, 0),
        min_p=_pick(body.min_p, cfg.min_p if cfg else None, 0.0),
        seed=body.seed,
        stop=_stops(body.stop),
        logprobs=bool(body.logprobs),
        top_logprobs=body.top_logprobs or 0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=body.repetition_penalty,
        logit_bias=_logit_bias(body.logit_bias),
    )
    request = GenerationRequest(
        request_id=request_id,
        model=model_id,
        messages=tuple(_message(m, i) for i, m in enumerate(body.messages)),
        sampling=sampling,
        tools=tuple(body.tools or ()),
        tool_choice=body.tool_choice,
        chat_template_kwargs=dict(body.chat_template_kwargs or {}),
        max_tokens_requested=requested,
        constraint=_constraint(body),
    )
    check_constraint(request)
    return request


def _pick(request_value: Any, config_value: Any, fallback: Any) -> Any:
    return request_value if request_value is not None else config_value if config_value is not None else fallback


def _reject_unsupported(body: ChatCompletionRequest, defaults: DefaultsConfig, cfg: ModelConfig | None) -> None:
    if body.tools and (not defaults.enable_function_calling or (cfg and cfg.supports_tools is False)):
        raise UnsupportedParameter("function calling is disabled for this model", param="tools")
    if body.n not in (None, 1):
        raise UnsupportedParameter("n > 1 is not supported: send one request per completion", param="n")
    if body.top_logprobs and not body.logprobs:
        raise InvalidRequest("top_logprobs requires logprobs to be true", param="top_logprobs")


def _constraint(body: ChatCompletionRequest) -> OutputConstraint | None:
    forced = _forced_tool_names(body)
    schema = _response_schema(body.response_format)
    if forced and schema is not None:
        raise InvalidRequest("response_format cannot be combined with a forced tool call", param="response_format")
    if forced:
        return OutputConstraint(tool_names=forced, parallel_calls=body.parallel_tool_calls is not False)
    return None if schema is None else OutputConstraint(json_schema=schema)


def _forced_tool_names(body: ChatCompletionRequest) -> tuple[str, ...]:
    """The functions `tool_choice` forces a call to: all offered ones for "required", or the named one."""
    choice = body.tool_choice
    if choice in (None, "auto", "none"):
        return ()
    names = tuple(n for n in (_tool_name(t) for t in body.tools or ()) if n)
    if choice == "required":
        if not names:
            raise InvalidRequest("tool_choice 'required' needs at least one function in tools", param="tool_choice")
        return names
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type", "function") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise InvalidRequest(
            'tool_choice must be \'auto\', \'none\', \'required\' or {"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    if fn["name"] not in names:
        raise InvalidRequest(f"tool_choice names function '{fn['name']}', which is not in tools", param="tool_choice")
    return (fn["name"],)


def _tool_name(tool: dict[str, Any]) -> str | None:
    fn = tool.get("function")
    name = fn.get("name") if isinstance(fn, dict) else None
    return name if isinstance(name, str) else None


def _response_schema(fmt: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema `response_format` asks for ({"type": "object"} for json_object), or None for text."""
    kind = (fmt or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = (fmt or {}).get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequest(
                "response_format.json_schema.schema must be a JSON schema object",
                param="response_format.json_schema.schema",
            )
        return schema
    raise InvalidRequest(
        f"response_format type '{kind}' is not supported: use 'text', 'json_object' or 'json_schema'",
        param="response_format.type",
    )


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if any(not s for s in stops):
        raise InvalidRequest("stop sequences must be non-empty strings", param="stop")
    return stops


def _logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    if not bias:
        return ()
    try:
        return tuple((int(k), float(v)) for k, v in bias.items())
    except ValueError:
        raise InvalidRequest("logit_bias keys must be token ids", param="logit_bias") from None


def _message(m: ChatMessage, index: int) -> Message:
    role = "system" if m.role == "developer" else m.role
    if m.role == "tool" and not m.tool_call_id:
        raise InvalidRequest("a tool message needs tool_call_id", param=f"messages.{index}.tool_call_id")
    calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in m.tool_calls or ())
    return Message(role=role, content=_text(m, index), tool_calls=calls, tool_call_id=m.tool_call_id, name=m.name)


def _text(m: ChatMessage, index: int) -> str | None:
    if m.content is None or isinstance(m.content, str):
        return m.content
    texts = []
    for j, part in enumerate(m.content):
        if part.type != "text" or part.text is None:
            raise UnsupportedParameter(
                f"content part type '{part.type}' is not supported by this server yet",
                param=f"messages.{index}.content.{j}",
            )
        texts.append(part.text)
    return "".join(texts)


def logprob_entry(lp: TokenLogprob) -> dict[str, Any]:
    return {
        "token": lp.token,
        "logprob": lp.logprob,
        "bytes": list(lp.bytes),
        "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)} for t in lp.top],
    }


def usage_dict(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


_MARK = "\x00text\x00"  # stands for a delta's text while the content-chunk template is cut


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


@dataclass(slots=True)
class ChunkWriter:
    """Builds the chunks of one streamed chat completion, each as JSON text.

    A plain content chunk (every token of most streams) is a prebuilt head and tail around the JSON string of its
    text: about a fifth of the cost of serialising the whole chunk each time.
    """

    completion_id: str
    model: str
    logprobs: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    _text_head: str = field(init=False, default="")
    _text_tail: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self._text_head, self._text_tail = self._chunk([self._choice({"content": _MARK})]).split(_json(_MARK))

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        return _json(
            {
                "id": self.completion_id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "system_fingerprint": None,
                "choices": choices,
                **extra,
            }
        )

    def _choice(self, delta: dict[str, Any], finish: FinishReason | None = None, lps: Any = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": lps, "finish_reason": finish}

    def role(self) -> str:
        return self._chunk([self._choice({"role": "assistant", "content": ""})])

    def text(self, delta: TextDelta) -> str:
        if not self.logprobs:
            return self._text_head + encode_basestring(delta.text) + self._text_tail
        lps = {"content": [logprob_entry(lp) for lp in delta.logprobs]}
        return self._chunk([self._choice({"content": delta.text}, lps=lps)])

    def reasoning(self, delta: ReasoningDelta) -> str:
        return self._chunk([self._choice({"reasoning_content": delta.text})])

    def tool_call(self, delta: ToolCallDelta) -> str:
        call: dict[str, Any] = {"index": delta.index, "function": {"arguments": delta.arguments}}
        if delta.id is not None:
            call.update(id=delta.id, type="function")
            call["function"]["name"] = delta.name
        return self._chunk([self._choice({"tool_calls": [call]})])

    def finish(self, reason: FinishReason) -> str:
        return self._chunk([self._choice({}, reason)])

    def usage(self, usage: Usage) -> str:
        return self._chunk([], usage=usage_dict(usage))


@dataclass(slots=True)
class CompletionBuilder:
    """Accumulates events into one non-streamed chat completion."""

    completion_id: str
    model: str
    logprobs: bool = False
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    token_logprobs: list[dict[str, Any]] = field(default_factory=list)

    def add(self, delta: TextDelta | ReasoningDelta | ToolCallDelta) -> None:
        if isinstance(delta, TextDelta):
            self.text.append(delta.text)
            self.token_logprobs.extend(logprob_entry(lp) for lp in delta.logprobs)
        elif isinstance(delta, ReasoningDelta):
            self.reasoning.append(delta.text)
        else:
            call = self.calls.setdefault(
                delta.index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
            )
            if delta.id is not None:
                call["id"], call["function"]["name"] = delta.id, delta.name
            call["function"]["arguments"] += delta.arguments

    def message(self) -> dict[str, Any]:
        text = "".join(self.text)
        message: dict[str, Any] = {"role": "assistant", "content": text if text or not self.calls else None}
        if self.calls:
            message["tool_calls"] = [self.calls[i] for i in sorted(self.calls)]
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        return message

    def build(self, finish: FinishReason, usage: Usage) -> dict[str, Any]:
        return {
            "id": self.completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": self.message(),
                    "logprobs": {"content": self.token_logprobs} if self.logprobs else None,
                    "finish_reason": finish,
                }
            ],
            "usage": usage_dict(usage),
        }
