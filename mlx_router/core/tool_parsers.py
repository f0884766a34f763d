"""Per-family tool-call formats: where a call starts and ends in the model's text, and how its body is read.

Pure text handling (no MLX, no model). `parsing.StreamParser` finds the markers while streaming and calls
`ToolParser.parse` on the buffered body. Bodies that mlx-lm already knows how to read are handed to its
`mlx_lm.tool_parsers` modules (imported lazily: importing `mlx_lm` loads MLX, which the callers here never need).
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


class ToolCallError(ValueError):
    """The text has tool-call markup but is not a well-formed call."""


@dataclass(frozen=True, slots=True)
class ParsedCall:
    """One call read from the model's text; `arguments` is always a JSON object."""

    name: str
    arguments: dict[str, Any]


def _mlx_parser(module: str, text: str, tools: Sequence[dict[str, Any]] | None = None) -> Any:
    """Run `mlx_lm.tool_parsers.<module>.parse_tool_call`, mapping any failure to ToolCallError."""
    parse = importlib.import_module(f"mlx_lm.tool_parsers.{module}").parse_tool_call
    try:
        return parse(text, list(tools) if tools else None)
    except Exception as exc:  # the mlx-lm parsers raise ValueError, KeyError, SyntaxError... on bad input
        raise ToolCallError(f"{module}: {exc}") from exc


def _as_call(obj: Any) -> ParsedCall:
    """Normalise `{"name", "arguments"|"parameters"}` (arguments possibly a JSON string) to a ParsedCall."""
    if not isinstance(obj, dict):
        raise ToolCallError(f"a tool call must be a JSON object, got {type(obj).__name__}")
    if isinstance(obj.get("function"), dict):  # OpenAI-shaped {"type": "function", "function": {...}}
        obj = obj["function"]
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as exc:
            raise ToolCallError(f"arguments are not valid JSON: {exc}") from exc
    if args is None:
        args = {}
    if not isinstance(name, str) or not name:
        raise ToolCallError("tool call has no function name")
    if not isinstance(args, dict):
        raise ToolCallError(f"arguments of {name!r} are not a JSON object")
    return ParsedCall(name, args)


def _as_calls(obj: Any) -> list[ParsedCall]:
    items = obj if isinstance(obj, list) else [obj]
    if not items:
        raise ToolCallError("empty tool-call list")
    return [_as_call(item) for item in items]


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ToolCallError(f"invalid JSON: {exc}") from exc


def _json_sequence(text: str, separators: str = "; \t\r\n") -> list[Any]:
    """Read one or more JSON values separated by `separators` (Llama 3 joins calls with ';')."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    pos = 0
    while True:
        while pos < len(text) and text[pos] in separators:
            pos += 1
        if pos == len(text):
            break
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise ToolCallError(f"invalid JSON: {exc}") from exc
        values.append(value)
    if not values:
        raise ToolCallError("no tool call found")
    return values


def _pythonic(calls_source: Sequence[str]) -> list[ParsedCall]:
    """Parse Python call expressions (`f(a=1)`) with mlx-lm's pythonic parser, after checking they are strict calls.

    The check stops mlx-lm's lenient regex fallback from turning ordinary bracketed prose into a call.
    """
    for source in calls_source:
        try:
            node = ast.parse(source.strip(), mode="eval").body
        except SyntaxError as exc:
            raise ToolCallError(f"not a Python call: {source!r}") from exc
        if not isinstance(node, ast.Call) or node.args or any(kw.arg is None for kw in node.keywords):
            raise ToolCallError(f"not a keyword-only Python call: {source!r}")
    result = _mlx_parser("pythonic", "[" + ", ".join(s.strip() for s in calls_source) + "]")
    return _as_calls(result)


def _python_statements(text: str) -> list[str]:
    """Split Python source into its top-level expression statements."""
    try:
        module = ast.parse(text.strip())
    except SyntaxError as exc:
        raise ToolCallError(f"not Python code: {exc}") from exc
    sources = [ast.get_source_segment(text.strip(), stmt) for stmt in module.body]
    if not sources or any(s is None for s in sources):
        raise ToolCallError("no Python call found")
    return [s for s in sources if s is not None]


# ---- grammar text for forced calls (llguidance Lark; see constrained.py) ----

# Writes a marker as a Lark terminal: a quoted string, or a special token reference where the tokenizer has one.
Literal = Callable[[str], str]
# (name, JSON schema of the parameters) of each function a forced call may choose.
ForcedTools = Sequence[tuple[str, dict[str, Any]]]

# Compact JSON: flexible whitespace would let a model pad its answer with blank lines until max_tokens.
_JSON_OPTIONS = {"whitespace_flexible": False}


def quoted(text: str) -> str:
    """A Lark string literal matching `text` as plain characters."""
    return json.dumps(text, ensure_ascii=False)


def json_rule(schema: dict[str, Any]) -> str:
    """A Lark expression for one JSON value valid against `schema` (compact separators)."""
    return "%json " + json.dumps({**schema, "x-guidance": _JSON_OPTIONS}, ensure_ascii=False)


def call_object_schema(tools: ForcedTools, args_key: str = "arguments") -> dict[str, Any]:
    """`{"name": ..., "<args_key>": {...}}` for any one of `tools`, its arguments valid against that tool's schema."""
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, args_key: params},
            "required": ["name", args_key],
            "additionalProperties": False,
        }
        for name, params in tools
    ]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


_NL = quoted("\n")


def _repeat(call: str, parallel: bool, separator: str = _NL) -> str:
    return f"{call} ({separator} {call})*" if parallel else call


def _json_list(tools: ForcedTools, parallel: bool) -> str:
    schema: dict[str, Any] = {"type": "array", "items": call_object_schema(tools), "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return json_rule(schema)


class ToolParser:
    """How one tool-call format is delimited and read (vLLM-style).

    `start_marker` opens a call; `end_marker` closes it (None: the call runs to the end of the output).
    A parser with `start_marker=None` matches a whole message that opens with one of `openers`
    (e.g. Llama's bare JSON calls). `parse` gets the text between the markers and raises ToolCallError.
    `call_grammar` writes the format as a grammar, for `tool_choice` forcing a call (None: not expressible).
    """

    start_marker: str | None = None
    end_marker: str | None = None
    openers: tuple[str, ...] = ()

    def parse(self, text: str, tools: Sequence[dict[str, Any]] = ()) -> list[ParsedCall]:
        raise NotImplementedError

    def call_grammar(self, tools: ForcedTools, *, parallel: bool, literal: Literal = quoted) -> str | None:
        return None


class HermesParser(ToolParser):
    """Qwen2.5/Qwen3/Hermes `<tool_call>{json}</tool_call>`, and Qwen3-Coder's XML body in the same tags."""

    start_marker = "<tool_call>"
    end_marker = "</tool_call>"

    def parse(self, text: str, tools: Sequence[dict[str, Any]] = ()) -> list[ParsedCall]:
        body = text.strip()
        if body.startswith("<function="):
            return [_qwen3_coder(body, tools)]
        return _as_calls(_mlx_parser("json_tools", body))

    def call_grammar(self, tools: ForcedTools, *, parallel: bool, literal: Literal = quoted) -> str | None:
        body = json_rule(call_object_schema(tools))
        return _repeat(f"{literal('<tool_call>')} {_NL} {body} {_NL} {literal('</tool_call>')}", parallel)


def _qwen3_coder(body: str, tools: Sequence[dict[str, Any]]) -> ParsedCall:
    call = _as_call(_mlx_parser("qwen3_coder", body, tools))
    # mlx-lm converts values by the tool's schema; parameters the schema does not describe stay strings,
    # so decode those when they are valid JSON (numbers, booleans, objects).
    known = _schema_properties(call.name, tools)
    args = dict(call.arguments)
    for key, value in args.items():
        if key not in known and isinstance(value, str):
            with contextlib.suppress(json.JSONDecodeError):
                args[key] = json.loads(value)
    return ParsedCall(call.name, args)


def _schema_properties(name: str, tools: Sequence[dict[str, Any]]) -> dict[str, Any]:
    for tool in tools:
        fn = tool.get("function", tool)
        if isinstance(fn, dict) and fn.get("name") == name:
            props = (fn.get("parameters") or {}).get("properties") or {}
            return props if isinstance(props, dict) else {}
    return {}


class LlamaJsonParser(ToolParser):
    """Llama 3.x: `{"name": ..., "parameters": {...}}` (several joined by ';'), bare or after `<|python_tag|>`."""

    def __init__(self, *, python_tag: bool) -> None:
        if python_tag:
            self.start_marker = "<|python_tag|>"
        else:
            self.openers = ("{",)

    def parse(self, text: str, tools: Sequence[dict[str, Any]] = ()) -> list[ParsedCall]:
        return [_as_call(value) for value in _json_sequence(text)]

    def call_grammar(self, tools: ForcedTools, *, parallel: bool, literal: Literal = quoted) -> str | None:
        # Bare JSON with "parameters", as Llama 3.1's template renders past calls (`<|python_tag|>` is for
        # its built-in tools).
        return _repeat(json_rule(call_object_schema(tools, "parameters")), parallel, quoted("; "))


class PythonicParser(ToolParser):
    """A list of Python calls, `[f(a=1, b="x"), g()]`: a whole message, or inside LFM2-style markers."""

    def __init__(self, *, markers: tuple[str, str] | None = None) -> None:
        if markers is None:
            self.openers = ("[",)
        else:
            self.start_marker, self.end_marker = markers

    def parse(self, text: str, tools: Sequence[dict[str, Any]] = ()) -> list[ParsedCall]:
        body = text.strip()
        try:
            node = ast.parse(body, mode="eval").body
        except SyntaxError as exc:
            raise ToolCallError(f"not a Python list of calls: {exc}") from exc
        if not isinstance(node, ast.List) or not node.elts:
            raise ToolCallError("not a Python list of calls")
        sources = [ast.get_source_segment(body, elt) or "" for elt in node.elts]
        return _pythonic(sources)


class MistralParser(ToolParser):
    """Mistral `[TOOL_CALLS][{...}, ...]` and the newer `[TOOL_CALLS]name[ARGS]{...}`; no end marker."""

    start_marker = "[TOOL_CALLS]"

    def parse(self, text: str, tools: Sequence[dict[str, Any]] = ()) -> list[ParsedCall]:
        # Newer models repeat the marker before every call; the mlx-lm parser skips over it.
        return _as_calls(_mlx_parser("mistral", text.strip()))

    def call_grammar(self, tools: ForcedTools, *, parallel: bool, literal: Literal = quoted) -> str | None:
        return f"{literal('[TOOL_CALLS]')} {_json_list(tools, parallel)}"


_DS_CALL = re.compile(r"<｜tool▁call▁begin｜>(.*?)<｜tool▁call▁end｜>", re.DOTALL)
_DS_FENCED = re.compile(r"^\s*([^\n]+?)\s*\n\s*```(?:json)?\s*\n?(.*?)\n?\s*```\s*$", re.DOTALL)


class DeepSeekParser(ToolParser):
    """DeepSeek V3/R1 `function<｜tool▁sep｜>NAME\\n```json ...```` and V3.1 `NAME<｜tool▁sep｜>{...}` calls.

    `outer=True` matches the `<｜tool▁calls▁begin｜>` block; `outer=False` a lone `<｜tool▁call▁begin｜>` call.
    """

    def __init__(self, *, outer: bool) -> None:
        if outer:
            self.start_marker, self.end_marker = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
        else:
            self.start_marker, self.end_marker = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>"

    def parse(self, text: str, tools: Sequence[dict[str, Any]] = ()) -> list[ParsedCall]:
        if self.start_marker == "<｜tool▁call▁begin｜>":
            bodies = [text]
        else:
            bodies = _DS_CALL.findall(text)
            if not bodies or _DS_CALL.sub("", text).strip():
                raise ToolCallError("malformed DeepSeek tool-call block")
        return [self._one(body) for body in bodies]

    @staticmethod
    def _one(body: str) -> ParsedCall:
        head, sep, rest = body.partition("<｜tool▁sep｜>")
        if not sep:
            raise ToolCallError("DeepSeek tool call without <｜tool▁sep｜>")
        if head.strip() == "function":
            match = _DS_FENCED.match(rest)
            if match is None:
                raise ToolCallError("DeepSeek tool call without a ```json block")
            name, args = match.group(1), _loads(match.group(2))
        else:
            name, args = head.strip(), _loads(rest)
        return _as_call({"name": name, "arguments": args})

    def call_grammar(self, tools: ForcedTools, *, parallel: bool, literal: Literal = quoted) -> str | None:
        if self.start_marker != "<｜tool▁calls▁begin｜>":
            return None
        fence, close = quoted("\n```json\n"), quoted("\n```")
        begin, sep, end = literal("<｜tool▁call▁begin｜>"), literal("<｜tool▁sep｜>"), literal("<｜tool▁call▁end｜>")
        calls = " | ".join(
            f'{begin} "function" {sep} {quoted(name)} {fence} {json_rule(params)} {close} {end}'
            for name, params in tools
        )
        body = f"({calls})+" if parallel else f"({calls})"
        return f"{literal('<｜tool▁calls▁begin｜>')} {body} {literal('<｜tool▁calls▁end｜>')}"


class Phi4Parser(ToolParser):
    """Phi-4 `<|tool_call|>[{"name": ..., "arguments": {...}}, ...]<|/tool_call|>`."""

    start_marker = "<|tool_call|>"
    end_marker = "<|/tool_call|>"

    def parse(self, text: str, tools: Sequence[dict[str, Any]] = ()) -> list[ParsedCall]:
        return _as_calls(_loads(text.strip()))

    def call_grammar(self, tools: ForcedTools, *, parallel: bool, literal: Literal = quoted) -> str | None:
        return f"{literal('<|tool_call|>')} {_json_list(tools, parallel)} {literal('<|/tool_call|>')}"


class GemmaParser(ToolParser):
    """Gemma ```` ```tool_code ```` fences holding Python calls, one per line."""

    start_marker = "```tool_code"
    end_marker = "```"

    def parse(self, text: str, tools: Sequence[dict[str, Any]] = ()) -> list[ParsedCall]:
        return _pythonic(_python_statements(text))


_HARMONY_RECIPIENT = re.compile(r"\bto=functions\.([^\s<]+)")


class HarmonyParser(ToolParser):
    """gpt-oss `<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}<|call|>`.

    `parse` gets the header and the body joined by `<|message|>`; the recipient may sit in either the
    role part (`assistant to=functions.x`) or the channel part of the header.
    """

    start_marker = "<|channel|>"
    end_marker = "<|call|>"

    def parse(self, text: str, tools: Sequence[dict[str, Any]] = ()) -> list[ParsedCall]:
        header, sep, body = text.partition("<|message|>")
        match = _HARMONY_RECIPIENT.search(header)
        if not sep or match is None:
            raise ToolCallError("harmony message without a functions.* recipient")
        args = _loads(body.strip()) if body.strip() else {}
        return [_as_call({"name": match.group(1), "arguments": args})]

    def call_grammar(self, tools: ForcedTools, *, parallel: bool, literal: Literal = quoted) -> str | None:
        # One call per message: harmony ends the turn with <|call|> and waits for the result.
        head, constrain, message = literal("<|channel|>"), literal("<|constrain|>"), literal("<|message|>")
        calls = " | ".join(
            f'{head} {quoted("commentary to=functions." + name + " ")} {constrain} "json" {message} '
            f"{json_rule(params)} {literal('<|call|>')}"
            for name, params in tools
        )
        return f"({calls})"


_HERMES = HermesParser()

# Every family's tool-call formats, tried in this order when markers tie.
TOOL_PARSERS: dict[str, tuple[ToolParser, ...]] = {
    "llama3": (LlamaJsonParser(python_tag=True), LlamaJsonParser(python_tag=False), PythonicParser()),
    "qwen": (_HERMES,),
    "chatml": (_HERMES,),
    "deepseek": (DeepSeekParser(outer=True), DeepSeekParser(outer=False)),
    "phi4": (Phi4Parser(),),
    "mistral": (MistralParser(),),
    "gemma": (GemmaParser(),),
    "gpt-oss": (HarmonyParser(),),
    "generic": (_HERMES, PythonicParser(markers=("<|tool_call_start|>", "<|tool_call_end|>")), PythonicParser()),
}

# Reasoning delimiters. Any family but gpt-oss (which uses its `analysis` channel) honours <think> if emitted.
THINK_START, THINK_END = "<think>", "</think>"


def tool_parsers_for(family: str) -> tuple[ToolParser, ...]:
    """The tool-call formats a family's models emit (the generic set for unknown families)."""
    return TOOL_PARSERS.get(family, TOOL_PARSERS["generic"])
