"""Structured output and forced tool calls: grammar-constrained decoding through the real server.

A random-weight model is the hard case: left alone it emits noise, so every valid answer here is the grammar's doing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from conftest import make_settings, run_server

from helper_tools.tiny_models import build_random_model, build_scripted_model

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "active"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"type": "string", "maxLength": 5}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
USER = [{"role": "user", "content": "Tell me about someone."}]
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("structured-models")
    build_random_model(root / "random")
    build_scripted_model(root / "chatty", "Charlie says hello!")
    with run_server(make_settings(root, tmp_path_factory.mktemp("cfg"), max_batch_size=8)) as server:
        server.model_root = root
        yield server


def client(srv: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0)


def ask(srv: Any, seed: int, **kwargs: Any) -> Any:
    args: dict[str, Any] = {"model": "random", "messages": USER, "temperature": 1.0, "seed": seed, "max_tokens": 300}
    return client(srv).chat.completions.create(**{**args, **kwargs})


@pytest.mark.parametrize("seed", range(6))
def test_json_schema_output_always_validates(srv: Any, seed: int) -> None:
    choice = ask(srv, seed, response_format=PERSON_FORMAT).choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object_streamed_is_one_object(srv: Any) -> None:
    # Any object is unbounded (a random model could write digits forever); a nudge toward "}" keeps it short.
    vocab = json.loads((srv.model_root / "random" / "tokenizer.json").read_text())["model"]["vocab"]
    bias = {str(vocab["}"]): 4.0}
    stream = ask(srv, 7, response_format={"type": "json_object"}, stream=True, logit_bias=bias)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert isinstance(json.loads(text), dict)


def test_constrained_and_free_requests_share_a_batch(srv: Any) -> None:
    def one(i: int) -> Any:
        fmt = PERSON_FORMAT if i % 2 == 0 else None
        return ask(srv, 100 + i, **({"response_format": fmt} if fmt else {})).choices[0]

    with ThreadPoolExecutor(8) as pool:
        choices = list(pool.map(one, range(8)))
    for choice in choices[::2]:
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    assert srv.manager.engine_of("random").peak_batch_size > 1


@pytest.mark.parametrize("seed", range(3))
def test_tool_choice_required_forces_one_valid_call(srv: Any, seed: int) -> None:
    choice = ask(srv, seed, tools=TOOLS, tool_choice="required", parallel_tool_calls=False).choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    schema = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), schema)


def test_parallel_forced_calls_are_each_valid(srv: Any) -> None:
    # A random model never chooses to stop calling, so max_tokens ends it: the complete calls are still returned
    # and the finish reason says the output was cut.
    choice = ask(srv, 2, tools=TOOLS, tool_choice="required", max_tokens=120).choices[0]
    assert choice.finish_reason == "length"
    assert len(choice.message.tool_calls or []) >= 2
    for call in choice.message.tool_calls or []:
        schema = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), schema)


def test_named_tool_choice_without_parallel_calls(srv: Any) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    for stream in (False, True):
        if stream:
            chunks = list(ask(srv, 3, tools=TOOLS, tool_choice=named, parallel_tool_calls=False, stream=True))
            deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
            assert {d.index for d in deltas} == {0} and deltas[0].function.name == "get_time"
            args = "".join(d.function.arguments or "" for d in deltas)
            assert chunks[-1].choices[0].finish_reason == "tool_calls"
        else:
            choice = ask(srv, 3, tools=TOOLS, tool_choice=named, parallel_tool_calls=False).choices[0]
            (call,) = choice.message.tool_calls or []
            assert call.function.name == "get_time"
            args = call.function.arguments
        jsonschema.validate(json.loads(args), TIME)


def test_forced_call_overrides_a_model_that_would_chat(srv: Any) -> None:
    r = client(srv).chat.completions.create(model="chatty", messages=USER, tools=TOOLS, tool_choice="required")  # type: ignore[arg-type]
    assert r.choices[0].finish_reason == "tool_calls"
    (call, *_) = r.choices[0].message.tool_calls or []
    assert call.function.name in {"get_weather", "get_time"}


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"if": {}, "then": {}}}}},
            "response_format",
            "if",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
            "schema",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format.type", "yaml"),
        ({"tool_choice": "required"}, "tool_choice", "tools"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "required"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
            "forced",
        ),
    ],
)
def test_bad_constraints_are_400s_naming_the_problem(srv: Any, body: dict[str, Any], param: str, needle: str) -> None:
    r = httpx.post(srv.base_url + "/v1/chat/completions", json={"model": "random", "messages": USER, **body})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == param and needle in error["message"]
