"""Every family's tool-call format through the real server: scripted models emit the markup token by token
(pieces of a word or two each), and the OpenAI SDK must get the same calls streamed and not streamed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from conftest import make_settings, run_server

from helper_tools.tiny_models import build_scripted_model

WEATHER, TIME = ("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})
TWO = [WEATHER, TIME]

# model id -> (family, reply, expected calls)
REPLIES: dict[str, tuple[str, str, list[tuple[str, dict[str, Any]]]]] = {
    "llama3": (
        "llama3",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {"zone": "CET"}}',
        TWO,
    ),
    "llama3-tag": ("llama3", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', [WEATHER]),
    "mistral": (
        "mistral",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "get_time", "arguments": {"zone": "CET"}}]',
        TWO,
    ),
    "phi4": (
        "phi4",
        '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "get_time", "arguments": {"zone": "CET"}}]<|/tool_call|>',
        TWO,
    ),
    "deepseek": (
        "deepseek",
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
        '{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n'
        '{"zone": "CET"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
        TWO,
    ),
    "gemma": ("gemma", '```tool_code\nget_weather(city="Paris")\nget_time(zone="CET")\n```', TWO),
    "gpt-oss": (
        "gpt-oss",
        '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>',
        [WEATHER],
    ),
    "qwen3-coder": (
        "qwen",
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>",
        [WEATHER],
    ),
    "pythonic": ("generic", '[get_weather(city="Paris"), get_time(zone="CET")]', TWO),
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": name, "parameters": {"type": "object", "properties": {key: {"type": "string"}}}},
    }
    for name, key in (("get_weather", "city"), ("get_time", "zone"))
]
USER = [{"role": "user", "content": "Weather and time in Paris?"}]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("family-models")
    for model_id, (_, reply, _) in REPLIES.items():
        build_scripted_model(root / model_id, reply)
    models = {model_id: {"family": family} for model_id, (family, _, _) in REPLIES.items()}
    with run_server(make_settings(root, tmp_path_factory.mktemp("cfg"), cache_size=3, models=models)) as server:
        yield server


def client(srv: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("model", sorted(REPLIES))
def test_family_calls_streamed_and_not(srv: Any, model: str) -> None:
    expected = REPLIES[model][2]
    r = client(srv).chat.completions.create(model=model, messages=USER, tools=TOOLS)  # type: ignore[arg-type]
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert not (choice.message.content or "").strip()
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or []]
    assert calls == expected

    chunks = list(client(srv).chat.completions.create(model=model, messages=USER, tools=TOOLS, stream=True))  # type: ignore[arg-type]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    streamed: dict[int, list[str]] = {}
    for chunk in chunks:
        for d in chunk.choices[0].delta.tool_calls or []:
            slot = streamed.setdefault(d.index, ["", ""])
            slot[0] += (d.function.name or "") if d.function else ""
            slot[1] += (d.function.arguments or "") if d.function else ""
    assert [(name, json.loads(args)) for name, args in (streamed[i] for i in sorted(streamed))] == expected
