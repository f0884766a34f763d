"""Tool calls and reasoning through the real server, with scripted models that emit Qwen-style markup.

The agent-loop tests use the shared models ``agent`` (Qwen/Hermes ``<tool_call>``) and ``agent-llama3``
(Llama 3 bare JSON), which call get_weather, then answer once the tool result is in the prompt.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import AGENT_ANSWER, make_settings, run_server

from helper_tools.tiny_models import build_scripted_model

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>'
TWO_CALLS = (
    'Checking both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
)
THINK = "<think>Two plus two is four.</think>The answer is 4."
TOOLS = [
    {"type": "function", "function": {"name": n, "parameters": {"type": "object", "properties": {}}}}
    for n in ("get_weather", "get_time")
]
USER = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def tool_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tool-models")
    build_scripted_model(root / "caller", CALL)
    build_scripted_model(root / "two", TWO_CALLS)
    build_scripted_model(root / "thinker", THINK)
    return root


@pytest.fixture
def srv(tool_models: Path, tmp_path: Path) -> Any:
    with run_server(make_settings(tool_models, tmp_path)) as server:
        yield server


def client(srv: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0)


def test_non_stream_tool_call(srv: Any) -> None:
    r = client(srv).chat.completions.create(model="caller", messages=USER, tools=TOOLS)  # type: ignore[arg-type]
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "C"}  # type: ignore[union-attr]
    listed = {m["id"]: m for m in httpx.get(srv.base_url + "/v1/models").json()["data"]}
    assert listed["caller"]["family"] == "qwen"  # detected from the template's <tool_call> marker


def test_stream_two_calls_equal_the_non_stream_result(srv: Any) -> None:
    c = client(srv)
    whole = c.chat.completions.create(model="two", messages=USER, tools=TOOLS)  # type: ignore[arg-type]
    chunks = list(c.chat.completions.create(model="two", messages=USER, tools=TOOLS, stream=True))  # type: ignore[arg-type]
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    calls: dict[int, dict[str, str]] = {}
    for ch in chunks:
        for tc in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            entry = calls.setdefault(tc.index, {"name": "", "arguments": "", "id": ""})
            if tc.id:
                entry["id"], entry["name"] = tc.id, tc.function.name or ""  # type: ignore[union-attr]
            entry["arguments"] += tc.function.arguments or ""  # type: ignore[union-attr]
    assert "<tool_call>" not in content and content.strip() == "Checking both."
    assert [calls[i]["name"] for i in sorted(calls)] == ["get_weather", "get_time"]
    streamed_args = [json.loads(calls[i]["arguments"]) for i in sorted(calls)]
    whole_calls = whole.choices[0].message.tool_calls or []
    assert streamed_args == [json.loads(t.function.arguments) for t in whole_calls]  # type: ignore[union-attr]
    assert (whole.choices[0].message.content or "").strip() == "Checking both."
    assert chunks[-1].choices[0].finish_reason == "tool_calls" == whole.choices[0].finish_reason


def test_a_call_to_a_function_not_offered_stays_plain_content(srv: Any) -> None:
    only_time = [TOOLS[1]]
    r = client(srv).chat.completions.create(model="caller", messages=USER, tools=only_time)  # type: ignore[arg-type]
    assert r.choices[0].message.content == CALL
    assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason == "stop"
    plain = client(srv).chat.completions.create(model="caller", messages=USER)
    assert plain.choices[0].message.content == CALL  # no tools offered: never parsed


@pytest.mark.parametrize(("choice", "parsed"), [("auto", True), ("none", False)])
def test_tool_choice_auto_parses_calls_and_none_leaves_text(srv: Any, choice: str, parsed: bool) -> None:
    r = client(srv).chat.completions.create(model="caller", messages=USER, tools=TOOLS, tool_choice=choice)  # type: ignore[arg-type]
    message = r.choices[0].message
    assert bool(message.tool_calls) is parsed
    assert r.choices[0].finish_reason == ("tool_calls" if parsed else "stop")
    assert message.content == (None if parsed else CALL)


Call = tuple[str, str, str]  # id, function name, arguments


def _turn(c: openai.OpenAI, model: str, messages: list[Any], stream: bool) -> tuple[str | None, list[Call], str | None]:
    """One turn offering get_weather: the reply's content, its tool calls and its finish_reason."""
    tools: Any = TOOLS[:1]
    if not stream:
        choice = c.chat.completions.create(model=model, messages=messages, tools=tools).choices[0]
        calls = [(t.id, t.function.name, t.function.arguments) for t in choice.message.tool_calls or []]  # type: ignore[union-attr]
        return choice.message.content, calls, choice.finish_reason
    content, finish, parts = "", None, dict[int, list[str]]()
    for chunk in c.chat.completions.create(model=model, messages=messages, tools=tools, stream=True):
        for delta_choice in chunk.choices:
            content += delta_choice.delta.content or ""
            for tc in delta_choice.delta.tool_calls or []:
                part = parts.setdefault(tc.index, ["", "", ""])
                for k, piece in enumerate(
                    (tc.id, tc.function and tc.function.name, tc.function and tc.function.arguments)
                ):
                    part[k] += piece or ""
            finish = delta_choice.finish_reason or finish
    return content or None, [(a, b, c) for a, b, c in (parts[i] for i in sorted(parts))], finish


@pytest.mark.parametrize(("model", "family"), [("agent", "qwen"), ("agent-llama3", "llama3")])
def test_agent_loop_calls_a_tool_then_answers_with_its_result(serve: Any, model: str, family: str) -> None:
    with serve() as srv:
        c = client(srv)
        for stream in (False, True):
            messages: list[Any] = [*USER]
            content, calls, finish = _turn(c, model, messages, stream)
            assert finish == "tool_calls" and not content
            ((call_id, name, arguments),) = calls
            assert call_id.startswith("call_") and name == "get_weather"
            assert json.loads(arguments) == {"city": "Paris", "unit": "C"}

            # The client runs the tool and sends the whole conversation back, as an agent loop does.
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            messages.append({"role": "assistant", "content": content, "tool_calls": [call]})
            messages.append({"role": "tool", "tool_call_id": call_id, "content": '{"temp": 21, "sky": "sunny"}'})
            content, calls, finish = _turn(c, model, messages, stream)
            assert (content, calls, finish) == (AGENT_ANSWER, [], "stop")
        listed = {m["id"]: m for m in httpx.get(srv.base_url + "/v1/models").json()["data"]}
        assert listed[model]["family"] == family  # detected from the loaded model's chat template


def test_reasoning_is_split_from_content(srv: Any) -> None:
    r = client(srv).chat.completions.create(model="thinker", messages=USER)
    message = r.choices[0].message.model_dump()
    assert message["content"] == "The answer is 4."
    assert message["reasoning_content"] == "Two plus two is four."
    body = {"model": "thinker", "messages": USER, "stream": True}
    with httpx.stream("POST", srv.base_url + "/v1/chat/completions", json=body, timeout=30) as s:
        deltas = [json.loads(x[6:])["choices"][0]["delta"] for x in s.iter_lines() if x.startswith("data: {")]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Two plus two is four."
    assert "".join(d.get("content") or "" for d in deltas) == "The answer is 4."
