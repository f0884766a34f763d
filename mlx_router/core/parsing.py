"""Split a model's streamed text into content, reasoning and tool calls.

`StreamParser` is a pure state machine over decoded text (no MLX, no tokens): markers are matched on text,
so they may be split across any chunk boundary; a possible marker prefix is held back, never emitted.
Feeding the whole text at once or one character at a time yields the same content, reasoning and calls.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

from loguru import logger

from mlx_router.core.tool_parsers import (
    THINK_END,
    THINK_START,
    TOOL_PARSERS,
    HarmonyParser,
    ParsedCall,
    ToolCallError,
    ToolParser,
    tool_parsers_for,
)
from mlx_router.core.types import Event, ReasoningDelta, TextDelta, ToolCall, ToolCallDelta

__all__ = [
    "TOOL_PARSERS",
    "ParsedCall",
    "ParsedOutput",
    "StreamParser",
    "ToolCallError",
    "ToolParser",
    "collect",
    "opens_reasoning",
    "tool_parsers_for",
]

Reasoning = Literal["enable", "disable"]

# gpt-oss harmony structure tokens (https://cookbook.openai.com/articles/openai-harmony).
_H_START, _H_CHANNEL, _H_MESSAGE = "<|start|>", "<|channel|>", "<|message|>"
_H_END, _H_CALL, _H_RETURN = "<|end|>", "<|call|>", "<|return|>"
_H_ENDS = (_H_END, _H_CALL, _H_RETURN)


class _Mode(Enum):
    TEXT = "text"
    REASONING = "reasoning"
    CALL = "call"
    ROLE = "role"  # harmony: after <|start|>, reading the role
    HEADER = "header"  # harmony: after <|channel|>, reading the channel header


def _scan(buf: str, markers: Sequence[str], final: bool) -> tuple[int, str | None]:
    """Find where `buf` stops being plain text.

    Returns (pos, marker): `marker` starts at `pos`, or marker is None and `buf[pos:]` must wait for more
    text because it may still become a marker. A match is taken only once no marker starting at or
    before it could still complete, so the result never depends on how the text was chunked.
    """
    pos, found = len(buf), None
    if not any(m and m[0] in buf for m in markers):  # the common case per token: no marker can start here
        return pos, found
    for marker in markers:
        at = buf.find(marker)
        if at != -1 and (at < pos or (at == pos and found is not None and len(marker) > len(found))):
            pos, found = at, marker
    if final:
        return pos, found
    longest = max((len(m) for m in markers), default=0)
    for start in range(max(0, len(buf) - longest + 1), min(pos, len(buf)) + 1):
        tail = buf[start:]
        if tail and any(len(m) > len(tail) and m.startswith(tail) for m in markers):
            return start, None
    return pos, found


def _allowed_names(tools: Sequence[dict[str, Any]], tool_choice: str | dict[str, Any] | None) -> frozenset[str]:
    if tool_choice == "none":
        return frozenset()
    if isinstance(tool_choice, dict):
        named = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
        if isinstance(named, str):
            return frozenset({named})
    names = set()
    for tool in tools:
        fn = tool.get("function", tool)
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            names.add(fn["name"])
    return frozenset(names)


class StreamParser:
    """Turn decoded model text into TextDelta / ReasoningDelta / ToolCallDelta events.

    `reasoning`: "enable" or None emits reasoning as ReasoningDelta, "disable" drops it.
    `start_in_reasoning`: the prompt already opened a reasoning block (e.g. ends with `<think>`),
    so the output starts inside it; see `opens_reasoning`.
    Tool markup is parsed only when `tools` offers a function (and tool_choice is not "none"); a call to
    a function not offered, or with unreadable arguments, is returned as content with its original markup.
    Whitespace directly before a parsed call, or trailing a turn that made calls, is markup layout and dropped.
    """

    def __init__(
        self,
        family: str,
        *,
        tools: Sequence[dict[str, Any]] = (),
        reasoning: Reasoning | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        start_in_reasoning: bool = False,
    ) -> None:
        self.family = family
        self._tools = tuple(tools)
        self._allowed = _allowed_names(self._tools, tool_choice)
        self._parsers: tuple[ToolParser, ...] = tool_parsers_for(family) if self._allowed else ()
        self._harmony = family == "gpt-oss"
        self._emit_reasoning = reasoning != "disable"
        self._mode = _Mode.REASONING if start_in_reasoning and not self._harmony else _Mode.TEXT
        self._buf = ""  # unconsumed input; may hold a marker prefix
        self._capture = ""  # body of the call / harmony role or header being read
        self._parser: ToolParser | None = None
        self._open = ""  # raw markup that opened the current call, for the content fallback
        self._prefix_len = 0  # leading part of _capture that is header, not body (harmony)
        self._role = ""  # harmony role header of the current message
        self._held_ws = ""  # trailing whitespace not yet emitted as content
        self._ws_before_call = ""
        self._at_start = True  # no non-whitespace content yet: whole-message calls may still start
        self._index = 0
        self._out: list[Event] = []
        self._finished = False

    @property
    def saw_tool_calls(self) -> bool:
        """Whether at least one tool call was emitted."""
        return self._index > 0

    def feed(self, text: str) -> list[Event]:
        """Consume the next decoded chunk and return the events it completes."""
        if self._finished:
            raise RuntimeError("StreamParser.feed() after finish()")
        self._buf += text
        self._run(final=False)
        return self._drain()

    def finish(self) -> list[Event]:
        """End of output: flush held text and close (or give back as content) an unterminated call."""
        if not self._finished:
            self._finished = True
            self._run(final=True)
            if self._mode is _Mode.CALL:
                self._close_call("")
            elif self._mode in (_Mode.ROLE, _Mode.HEADER):
                logger.debug("dropping unterminated harmony header {!r}", self._capture)
            if self._held_ws and not self.saw_tool_calls:
                self._out.append(TextDelta(self._held_ws))
            self._held_ws = ""
        return self._drain()

    # -- machine -------------------------------------------------------------------------------------

    def _markers(self) -> list[str]:
        mode = self._mode
        if self._harmony:
            if mode is _Mode.TEXT:
                return [_H_START, _H_CHANNEL, _H_MESSAGE, *_H_ENDS, "<|constrain|>"]
            if mode is _Mode.REASONING:
                return [_H_START, _H_CHANNEL, *_H_ENDS]
            if mode is _Mode.ROLE:
                return [_H_CHANNEL, _H_MESSAGE]
            if mode is _Mode.HEADER:
                return [_H_MESSAGE]
            return list(_H_ENDS)
        if mode is _Mode.TEXT:
            return [THINK_START, *(p.start_marker for p in self._parsers if p.start_marker)]
        if mode is _Mode.REASONING:
            return [THINK_END]
        assert self._parser is not None
        return [self._parser.end_marker] if self._parser.end_marker else []

    def _run(self, *, final: bool) -> None:
        while self._buf:
            if self._mode is _Mode.TEXT and self._at_start and self._whole_message_call(final):
                continue
            pos, marker = _scan(self._buf, self._markers(), final)
            self._consume(self._buf[:pos])
            if marker is None:
                self._buf = self._buf[pos:]
                return
            self._buf = self._buf[pos + len(marker) :]
            self._on_marker(marker)

    def _whole_message_call(self, final: bool) -> bool:
        """At message start, enter a marker-less call (Llama JSON, pythonic list) when the text opens like one."""
        openers = [p for p in self._parsers if p.openers]
        if not openers:
            return False
        stripped = self._buf.lstrip()
        if not stripped:
            if final:
                return False
            # All whitespace so far: it becomes held whitespace either way, so take it and wait.
            self._consume(self._buf)
            self._buf = ""
            return True
        for parser in openers:
            if stripped.startswith(parser.openers):
                self._consume(self._buf[: len(self._buf) - len(stripped)])
                self._buf = stripped
                self._start_call(parser, "")
                return True
        return False

    def _consume(self, text: str) -> None:
        if not text:
            return
        mode = self._mode
        if mode is _Mode.TEXT:
            self._text(text)
        elif mode is _Mode.REASONING:
            if self._emit_reasoning:
                self._out.append(ReasoningDelta(text))
        else:
            self._capture += text

    def _text(self, text: str) -> None:
        """Emit content, holding trailing whitespace until we know whether a call follows."""
        text = self._held_ws + text
        body = text.rstrip()
        self._held_ws = text[len(body) :]
        if body:
            self._at_start = False
            self._out.append(TextDelta(body))

    def _on_marker(self, marker: str) -> None:
        if self._harmony:
            self._on_harmony_marker(marker)
        elif self._mode is _Mode.TEXT:
            if marker == THINK_START:
                self._mode = _Mode.REASONING
            else:
                self._start_call(next(p for p in self._parsers if p.start_marker == marker), marker)
        elif self._mode is _Mode.REASONING:
            self._mode = _Mode.TEXT
        else:
            self._close_call(marker)

    def _on_harmony_marker(self, marker: str) -> None:
        mode = self._mode
        if mode is _Mode.CALL:
            self._close_call(marker)
            self._role = ""
        elif marker == _H_START:
            self._mode, self._capture, self._role = _Mode.ROLE, "", ""
        elif marker == _H_CHANNEL:
            if mode is _Mode.ROLE:
                self._role = self._capture
            self._mode, self._capture = _Mode.HEADER, ""
        elif marker == _H_MESSAGE and mode in (_Mode.ROLE, _Mode.HEADER):
            self._open_harmony_body(self._capture if mode is _Mode.HEADER else "", mode)
        elif mode is _Mode.REASONING:  # an end token closes the analysis message
            self._mode, self._role = _Mode.TEXT, ""
        else:  # structure tokens in text carry no content
            self._role = ""

    def _open_harmony_body(self, header: str, mode: _Mode) -> None:
        if mode is _Mode.ROLE:
            self._role = self._capture
        full = f"{self._role} {header}"
        self._capture = ""
        if "to=" in full:
            opened = f"{_H_START}{self._role}" if self._role else ""
            opened += (f"{_H_CHANNEL}{header}" if mode is _Mode.HEADER else "") + _H_MESSAGE
            # The parser reads the recipient from the header, so it leads the captured body.
            self._start_call(self._parsers[0] if self._parsers else HarmonyParser(), opened, f"{full}{_H_MESSAGE}")
        elif header.strip().startswith("analysis"):
            self._mode = _Mode.REASONING
        else:
            self._mode = _Mode.TEXT

    def _start_call(self, parser: ToolParser, opened: str, prefix: str = "") -> None:
        self._mode, self._parser, self._open, self._capture = _Mode.CALL, parser, opened, prefix
        self._prefix_len = len(prefix)
        self._ws_before_call, self._held_ws = self._held_ws, ""

    def _close_call(self, closed: str) -> None:
        parser, capture = self._parser, self._capture
        assert parser is not None
        self._mode, self._parser, self._capture = _Mode.TEXT, None, ""
        body = capture[self._prefix_len :]
        markup = self._open + body + closed
        calls = self._validate(parser, capture) if self._parsers else None
        if calls is None:
            # Give the markup back verbatim, with the whitespace that preceded it.
            self._held_ws = self._ws_before_call
            self._text(markup)
            return
        self._at_start = False
        for call in calls:
            self._out.append(ToolCallDelta(self._index, id=f"call_{secrets.token_hex(12)}", name=call.name))
            self._out.append(ToolCallDelta(self._index, arguments=json.dumps(call.arguments, ensure_ascii=False)))
            self._index += 1

    def _validate(self, parser: ToolParser, body: str) -> list[ParsedCall] | None:
        try:
            calls = parser.parse(body, self._tools)
        except ToolCallError as exc:
            logger.warning("{} tool call not parsed, returned as content: {}", self.family, exc)
            return None
        unknown = sorted({c.name for c in calls} - self._allowed)
        if unknown:
            logger.warning("{} tool call to a function not offered ({}), returned as content", self.family, unknown)
            return None
        return calls

    def _drain(self) -> list[Event]:
        out, self._out = self._out, []
        merged: list[Event] = []
        for event in out:  # join adjacent text/reasoning pieces produced by one chunk
            last = merged[-1] if merged else None
            if isinstance(event, TextDelta) and isinstance(last, TextDelta):
                merged[-1] = TextDelta(last.text + event.text)
            elif isinstance(event, ReasoningDelta) and isinstance(last, ReasoningDelta):
                merged[-1] = ReasoningDelta(last.text + event.text)
            else:
                merged.append(event)
        return merged


def opens_reasoning(prompt: str, family: str) -> bool:
    """Whether a rendered prompt ends inside an open reasoning block (DeepSeek-R1 and Qwen3 thinking prompts end
    with `<think>`), so the output starts there: pass the result as `StreamParser(start_in_reasoning=...)`."""
    return family != "gpt-oss" and prompt.rstrip().endswith(THINK_START)


@dataclass(frozen=True, slots=True)
class ParsedOutput:
    """A whole generation's events folded together (for non-streaming responses)."""

    content: str
    reasoning: str
    tool_calls: tuple[ToolCall, ...]


def collect(events: Iterable[Event]) -> ParsedOutput:
    """Fold TextDelta / ReasoningDelta / ToolCallDelta events into content, reasoning and complete calls."""
    content: list[str] = []
    reasoning: list[str] = []
    calls: dict[int, list[str]] = {}  # index -> [id, name, arguments]
    for event in events:
        if isinstance(event, TextDelta):
            content.append(event.text)
        elif isinstance(event, ReasoningDelta):
            reasoning.append(event.text)
        elif isinstance(event, ToolCallDelta):
            slot = calls.setdefault(event.index, ["", "", ""])
            slot[0] = event.id or slot[0]
            slot[1] = event.name or slot[1]
            slot[2] += event.arguments
    tool_calls = tuple(ToolCall(id=i, name=n, arguments=a) for i, n, a in (calls[k] for k in sorted(calls)))
    return ParsedOutput("".join(content), "".join(reasoning), tool_calls)
