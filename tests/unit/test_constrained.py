"""Forced-call grammars round-trip: each family's grammar accepts the text its parser reads, and nothing looser."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import llguidance
import pytest
from llguidance import LLMatcher

from helper_tools.tiny_models import build_random_model
from mlx_router.core.constrained import build_grammar, check_constraint
from mlx_router.core.errors import InvalidRequest
from mlx_router.core.parsing import StreamParser, collect
from mlx_router.core.types import GenerationRequest, OutputConstraint, SamplingParams

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"],
}
TOOLS = (
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
)
ARGS = '{"city":"Paris","unit":"C"}'
CALL = '{"name":"get_weather","arguments":' + ARGS + "}"

# One forced call to get_weather in each family's own format, as its parser reads it.
FORMATS = {
    "qwen": f"<tool_call>\n{CALL}\n</tool_call>",
    "chatml": f"<tool_call>\n{CALL}\n</tool_call>",
    "generic": f"<tool_call>\n{CALL}\n</tool_call>",
    "llama3": '{"name":"get_weather","parameters":' + ARGS + "}",
    "mistral": f"[TOOL_CALLS][{CALL}]",
    "phi4": f"<|tool_call|>[{CALL}]<|/tool_call|>",
    "deepseek": (
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
        f"{ARGS}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
    ),
    "gpt-oss": f"<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{ARGS}<|call|>",
}


@pytest.fixture(scope="module")
def ll_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = build_random_model(tmp_path_factory.mktemp("tok") / "m")
    return llguidance.LLTokenizer((Path(folder) / "tokenizer.json").read_text())


def request(constraint: OutputConstraint) -> GenerationRequest:
    return GenerationRequest("r", "m", (), SamplingParams(max_tokens=10), tools=TOOLS, constraint=constraint)


def accepts(ll_tokenizer: Any, grammar: str, text: str) -> bool:
    matcher = LLMatcher(ll_tokenizer, LLMatcher.grammar_from_lark(grammar), log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    ok = matcher.consume_tokens(ll_tokenizer.tokenize_str(text))
    return bool(ok) and matcher.is_accepting()


@pytest.mark.parametrize("family", sorted(FORMATS))
def test_forced_call_grammar_matches_the_family_parser(ll_tokenizer: Any, family: str) -> None:
    grammar = build_grammar(request(OutputConstraint(tool_names=("get_weather",))), family, in_reasoning=False)
    text = FORMATS[family]
    assert accepts(ll_tokenizer, grammar, text)
    parser = StreamParser(family, tools=TOOLS)
    parsed = collect([*parser.feed(text), *parser.finish()])
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [("get_weather", json.loads(ARGS))]
    assert not parsed.content.strip()


@pytest.mark.parametrize("family", ["qwen", "mistral"])
def test_forced_call_rejects_other_functions_and_bad_arguments(ll_tokenizer: Any, family: str) -> None:
    grammar = build_grammar(request(OutputConstraint(tool_names=("get_weather",))), family, in_reasoning=False)
    good = FORMATS[family]
    assert not accepts(ll_tokenizer, grammar, good.replace("get_weather", "get_time"))
    assert not accepts(ll_tokenizer, grammar, good.replace('"C"', '"K"'))


def test_parallel_calls_only_when_allowed(ll_tokenizer: Any) -> None:
    two = FORMATS["qwen"] + "\n" + FORMATS["qwen"]
    parallel = build_grammar(request(OutputConstraint(tool_names=("get_weather",))), "qwen", in_reasoning=False)
    single = build_grammar(
        request(OutputConstraint(tool_names=("get_weather",), parallel_calls=False)), "qwen", in_reasoning=False
    )
    assert accepts(ll_tokenizer, parallel, two)
    assert not accepts(ll_tokenizer, single, two)


def test_open_reasoning_block_is_closed_first(ll_tokenizer: Any) -> None:
    grammar = build_grammar(request(OutputConstraint(json_schema=WEATHER)), "qwen", in_reasoning=True)
    assert accepts(ll_tokenizer, grammar, "</think>\n\n" + ARGS)
    assert not accepts(ll_tokenizer, grammar, ARGS)


def test_json_is_compact_and_schema_bound(ll_tokenizer: Any) -> None:
    grammar = build_grammar(request(OutputConstraint(json_schema=WEATHER)), "qwen", in_reasoning=False)
    assert accepts(ll_tokenizer, grammar, ARGS)
    assert not accepts(ll_tokenizer, grammar, '{"city": "Paris", "unit": "C"}')  # padded
    assert not accepts(ll_tokenizer, grammar, '{"city":"Paris"}')  # "unit" is required


def test_python_call_formats_cannot_be_forced() -> None:
    with pytest.raises(InvalidRequest, match="gemma"):
        build_grammar(request(OutputConstraint(tool_names=("get_weather",))), "gemma", in_reasoning=False)


def test_unsupported_schema_keywords_are_named() -> None:
    with pytest.raises(InvalidRequest, match="dependentRequired") as info:
        check_constraint(request(OutputConstraint(json_schema={"type": "object", "dependentRequired": {"a": ["b"]}})))
    assert info.value.param == "response_format"
    bad_tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "if": {}}}}
    forced = GenerationRequest(
        "r", "m", (), SamplingParams(max_tokens=10), tools=(bad_tool,), constraint=OutputConstraint(tool_names=("f",))
    )
    with pytest.raises(InvalidRequest, match="if") as info:
        check_constraint(forced)
    assert info.value.param == "tools"
