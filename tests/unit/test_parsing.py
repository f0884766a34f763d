"""StreamParser conformance: the same suite for every family, plus each format's own variants."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from mlx_router.core.parsing import ParsedOutput, StreamParser, collect, opens_reasoning
from mlx_router.core.templates import FAMILIES, messages_to_template_dicts, render_builtin
from mlx_router.core.tool_parsers import TOOL_PARSERS
from mlx_router.core.types import Event, Message, ReasoningDelta, TextDelta, ToolCall, ToolCallDelta

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]

Call = tuple[str, dict[str, Any]]
PARIS: Call = ("get_weather", {"city": "Paris", "days": 2})
NOW: Call = ("get_time", {})


def _j(value: Any) -> str:
    return json.dumps(value)


def _py(call: Call) -> str:
    return f"{call[0]}(" + ", ".join(f"{k}={_j(v)}" for k, v in call[1].items()) + ")"


def _harmony(call: Call) -> str:
    return f"<|channel|>commentary to=functions.{call[0]} <|constrain|>json<|message|>{_j(call[1])}<|call|>"


def _deepseek(call: Call) -> str:
    return f"<｜tool▁call▁begin｜>function<｜tool▁sep｜>{call[0]}\n```json\n{_j(call[1])}\n```<｜tool▁call▁end｜>"


# What each family's model emits for a turn of calls (written from the documented formats, not the templates).
EMIT: dict[str, Callable[[Sequence[Call]], str]] = {
    "llama3": lambda cs: "<|python_tag|>" + "; ".join(_j({"name": n, "parameters": a}) for n, a in cs),
    "qwen": lambda cs: "\n".join(f"<tool_call>\n{_j({'name': n, 'arguments': a})}\n</tool_call>" for n, a in cs),
    "chatml": lambda cs: "".join(f"<tool_call>{_j({'name': n, 'arguments': a})}</tool_call>" for n, a in cs),
    "deepseek": lambda cs: "<｜tool▁calls▁begin｜>" + "\n".join(_deepseek(c) for c in cs) + "<｜tool▁calls▁end｜>",
    "phi4": lambda cs: "<|tool_call|>" + _j([{"name": n, "arguments": a} for n, a in cs]) + "<|/tool_call|>",
    "mistral": lambda cs: "[TOOL_CALLS]" + _j([{"name": n, "arguments": a} for n, a in cs]),
    "gemma": lambda cs: "```tool_code\n" + "\n".join(_py(c) for c in cs) + "\n```",
    "gpt-oss": lambda cs: "<|start|>assistant".join(_harmony(c) for c in cs),
    "generic": lambda cs: "\n".join(f"<tool_call>{_j({'name': n, 'arguments': a})}</tool_call>" for n, a in cs),
}

# A call whose arguments do not parse, per family.
BAD: dict[str, str] = {
    "llama3": '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"',
    "qwen": '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>',
    "chatml": '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"</tool_call>',
    "deepseek": "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
    "```json\n{city: Paris}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
    "phi4": '<|tool_call|>[{"name": "get_weather", "arguments": {"city" "Paris"}}]<|/tool_call|>',
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}',
    "gemma": '```tool_code\nget_weather(city="Paris"\n```',
    "gpt-oss": "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{city: Paris}<|call|>",
    "generic": '<tool_call>{"name": "get_weather", "arguments": [1, </tool_call>',
}


def plain(family: str, text: str) -> str:
    """Answer text as the family emits it (gpt-oss wraps it in its final channel)."""
    if family == "gpt-oss":
        return f"<|channel|>final<|message|>{text}<|end|><|start|>assistant"
    return text


def think(family: str, thought: str) -> str:
    """A reasoning block as the family emits it (gpt-oss: its analysis channel)."""
    if family == "gpt-oss":
        return f"<|channel|>analysis<|message|>{thought}<|end|><|start|>assistant"
    return f"<think>{thought}</think>"


def run(family: str, chunks: Sequence[str], **kwargs: Any) -> list[Event]:
    kwargs.setdefault("tools", TOOLS)
    parser = StreamParser(family, **kwargs)
    events: list[Event] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events + parser.finish()


def calls_of(out: ParsedOutput) -> list[Call]:
    return [(c.name, json.loads(c.arguments)) for c in out.tool_calls]


def summary(events: list[Event]) -> tuple[str, str, list[Call]]:
    out = collect(events)
    return out.content, out.reasoning, calls_of(out)


def chunkings(text: str) -> list[list[str]]:
    """Whole, one character at a time, and every two-piece split (so each marker is cut at every point)."""
    return [[text], list(text), *([text[:i], text[i:]] for i in range(1, len(text)))]


def test_every_family_has_parsers_and_fixtures() -> None:
    assert set(TOOL_PARSERS) == set(FAMILIES) == set(EMIT) == set(BAD)


@pytest.mark.parametrize("family", FAMILIES)
class TestConformance:
    def test_single_call(self, family: str) -> None:
        events = run(family, [EMIT[family]([PARIS])])
        assert summary(events) == ("", "", [PARIS])
        deltas = [e for e in events if isinstance(e, ToolCallDelta)]
        first = deltas[0]
        assert first.index == 0 and first.name == "get_weather" and first.id and first.id.startswith("call_")
        assert all(d.id is None and d.name is None for d in deltas[1:])
        assert json.loads("".join(d.arguments for d in deltas)) == PARIS[1]

    def test_two_calls(self, family: str) -> None:
        events = run(family, [EMIT[family]([PARIS, NOW])])
        assert summary(events) == ("", "", [PARIS, NOW])
        firsts = [e for e in events if isinstance(e, ToolCallDelta) and e.id]
        assert [e.index for e in firsts] == [0, 1]
        assert len({e.id for e in firsts}) == 2

    def test_text_before_call(self, family: str) -> None:
        text = plain(family, "Let me check.") + EMIT[family]([PARIS])
        assert summary(run(family, [text])) == ("Let me check.", "", [PARIS])

    @pytest.mark.parametrize("calls", [[PARIS], [PARIS, NOW]])
    def test_any_chunking_gives_the_same_result(self, family: str, calls: list[Call]) -> None:
        text = plain(family, "Sure: ") + EMIT[family](calls)
        expected = summary(run(family, [text]))
        assert expected == ("Sure:", "", calls)
        for chunks in chunkings(text):
            assert summary(run(family, chunks)) == expected, chunks

    def test_marker_prefix_is_never_emitted(self, family: str) -> None:
        text = EMIT[family]([PARIS])
        for cut in range(1, len(text)):
            events = StreamParser(family, tools=TOOLS).feed(text[:cut])
            assert not [e for e in events if isinstance(e, TextDelta)], text[:cut]

    def test_unknown_function_is_content(self, family: str) -> None:
        text = EMIT[family]([("launch_rocket", {"target": "moon"})])
        for chunks in ([text], list(text)):
            parser = StreamParser(family, tools=TOOLS)
            events = [e for c in chunks for e in parser.feed(c)] + parser.finish()
            assert summary(events) == (text, "", [])
            assert not parser.saw_tool_calls

    def test_bad_arguments_are_content(self, family: str) -> None:
        text = BAD[family]
        for chunks in ([text], list(text)):
            assert summary(run(family, chunks)) == (text, "", [])

    def test_no_tools_means_plain_text(self, family: str) -> None:
        text = EMIT[family]([PARIS])
        for chunks in ([text], list(text)):
            assert summary(run(family, chunks, tools=[])) == (text, "", [])
        assert summary(run(family, [text], tool_choice="none")) == (text, "", [])

    @pytest.mark.parametrize("reasoning", ["enable", None, "disable"])
    def test_reasoning(self, family: str, reasoning: str | None) -> None:
        text = think(family, "The user greets me.") + ("<|channel|>final<|message|>" if family == "gpt-oss" else "")
        text += "Hello!"
        thought = "" if reasoning == "disable" else "The user greets me."
        for chunks in chunkings(text):
            assert summary(run(family, chunks, reasoning=reasoning)) == ("Hello!", thought, []), chunks

    def test_reasoning_then_call(self, family: str) -> None:
        text = think(family, "Need weather.") + EMIT[family]([PARIS])
        for chunks in ([text], list(text)):
            assert summary(run(family, chunks)) == ("", "Need weather.", [PARIS])

    def test_plain_answer_passes_through(self, family: str) -> None:
        answer = "The answer is 42 < 43, [see notes] {ok}.\n"
        for chunks in ([plain(family, answer)], list(plain(family, answer))):
            assert summary(run(family, chunks)) == (answer, "", [])


# -- format-specific variants ----------------------------------------------------------------------------


def one(family: str, text: str, **kwargs: Any) -> tuple[str, str, list[Call]]:
    whole = summary(run(family, [text], **kwargs))
    assert summary(run(family, list(text), **kwargs)) == whole
    return whole


def test_qwen3_coder_xml() -> None:
    text = (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nSan Francisco\n</parameter>\n"
        '<parameter=days>\n3\n</parameter>\n<parameter=extra>\n{"a": [1, true]}\n</parameter>\n'
        "</function>\n</tool_call>"
    )
    expected = {"city": "San Francisco", "days": 3, "extra": {"a": [1, True]}}
    assert one("qwen", text) == ("", "", [("get_weather", expected)])


def test_llama_bare_json_calls() -> None:
    text = '{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}; {"name": "get_time", "parameters": {}}'
    assert one("llama3", text) == ("", "", [PARIS, NOW])
    assert one("llama3", "\n " + text) == ("", "", [PARIS, NOW])


def test_llama_json_answer_that_is_not_a_call_stays_content() -> None:
    text = '{"answer": 42}'
    assert one("llama3", text) == (text, "", [])


def test_llama_pythonic_list() -> None:
    assert one("llama3", '[get_weather(city="Paris", days=2), get_time()]') == ("", "", [PARIS, NOW])


def test_mistral_args_form() -> None:
    text = 'Ok.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 2}[TOOL_CALLS]get_time[ARGS]{}'
    assert one("mistral", text) == ("Ok.", "", [PARIS, NOW])


def test_deepseek_v31_form() -> None:
    text = (
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>"
        '{"city": "Paris", "days": 2}<｜tool▁call▁end｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{}'
        "<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
    )
    assert one("deepseek", text) == ("", "", [PARIS, NOW])
    bare = '<｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris", "days": 2}<｜tool▁call▁end｜>'
    assert one("deepseek", bare) == ("", "", [PARIS])


def test_deepseek_r1_prompt_opens_reasoning() -> None:
    prompt = "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜><think>\n"
    assert opens_reasoning(prompt, "deepseek")
    assert not opens_reasoning("<think>a</think>", "qwen")
    assert not opens_reasoning("Use <think> tags.<|im_start|>assistant\n", "qwen")
    text = "Hmm, a greeting.</think>Hello!"
    assert one("deepseek", text, start_in_reasoning=True) == ("Hello!", "Hmm, a greeting.", [])


def test_generic_pythonic_and_lfm_markers() -> None:
    assert one("generic", '[get_weather(city="Paris", days=2), get_time()]') == ("", "", [PARIS, NOW])
    text = 'Sure<|tool_call_start|>[get_weather(city="Paris", days=2)]<|tool_call_end|>'
    assert one("generic", text) == ("Sure", "", [PARIS])


def test_generic_bracketed_prose_is_content() -> None:
    for text in ("[1] Smith et al. say hi", "[get_weather(city=x)] is how you call it", "[]"):
        assert one("generic", text) == (text, "", [])


def test_gemma_json_literals() -> None:
    text = '```tool_code\nget_weather(city="Paris", days=2, detailed=true)\n```'
    assert one("gemma", text) == ("", "", [("get_weather", {"city": "Paris", "days": 2, "detailed": True})])


def test_harmony_recipient_in_role_header_and_preamble() -> None:
    text = (
        "<|channel|>commentary<|message|>Checking the weather.<|end|>"
        '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris", "days": 2}'
    )
    assert one("gpt-oss", text) == ("Checking the weather.", "", [PARIS])


def test_harmony_other_recipient_is_content() -> None:
    text = '<|channel|>commentary to=browser.search <|constrain|>json<|message|>{"q": "x"}<|call|>'
    assert one("gpt-oss", text) == (text, "", [])


def test_harmony_rejected_call_keeps_its_markup() -> None:
    text = '<|start|>assistant to=functions.launch<|message|>{"x": 1}<|call|>'
    assert one("gpt-oss", text) == (text, "", [])


def test_tool_choice_named_function_limits_calls() -> None:
    text = EMIT["qwen"]([PARIS, NOW])
    choice = {"type": "function", "function": {"name": "get_weather"}}
    content, _, calls = one("qwen", text, tool_choice=choice)
    assert calls == [PARIS]
    assert content == "\n" + EMIT["qwen"]([NOW])  # a rejected call keeps the whitespace before it


def test_whitespace_kept_without_calls_and_dropped_around_calls() -> None:
    assert one("qwen", "  Hello\n\n") == ("  Hello\n\n", "", [])
    assert one("qwen", "Hello\n\n" + EMIT["qwen"]([PARIS]) + "\n") == ("Hello", "", [PARIS])
    assert one("qwen", "<think>x</think>\n\n" + EMIT["qwen"]([PARIS])) == ("", "x", [PARIS])


def test_unterminated_call_is_parsed_at_finish() -> None:
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n'
    assert one("qwen", text) == ("", "", [PARIS])


def test_event_types_and_saw_tool_calls() -> None:
    parser = StreamParser("qwen", tools=TOOLS)
    events = parser.feed("<think>a</think>b") + parser.feed(EMIT["qwen"]([PARIS]))
    events += parser.finish()
    assert parser.saw_tool_calls
    assert [type(e) for e in events] == [ReasoningDelta, TextDelta, ToolCallDelta, ToolCallDelta]
    with pytest.raises(RuntimeError):
        parser.feed("more")


@pytest.mark.parametrize("family", FAMILIES)
def test_builtin_template_calls_parse_back(family: str) -> None:
    """What a built-in template renders for an assistant's calls is what that family's parser reads."""
    calls = (ToolCall("call_1", "get_weather", '{"city": "Paris", "days": 2}'), ToolCall("call_2", "get_time", "{}"))
    user = [Message("user", "Weather?")]
    prefix = render_builtin(family, messages_to_template_dicts(user), tools=TOOLS)
    full = render_builtin(
        family,
        messages_to_template_dicts([*user, Message("assistant", None, calls)]),
        tools=TOOLS,
        add_generation_prompt=False,
    )
    assert full.startswith(prefix)
    output = full[len(prefix) :]
    for end in ("<|eot_id|>", "<|im_end|>\n", "<|im_end|>", "<｜end▁of▁sentence｜>", "</s>", "<end_of_turn>\n"):
        output = output.removesuffix(end)
    assert one(family, output) == ("", "", [PARIS, NOW])
