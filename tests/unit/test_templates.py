"""Built-in chat templates against hand-written golden prompts, family detection, and the tokenizer path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from mlx_router.core.errors import InvalidRequest
from mlx_router.core.templates import (
    BUILTIN_TEMPLATES,
    FAMILIES,
    detect_family,
    messages_to_template_dicts,
    render_builtin,
    render_prompt,
)
from mlx_router.core.types import Message, ToolCall

GOLDEN = Path(__file__).resolve().parents[1] / "testdata" / "templates"

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather for a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    }
]

CONVERSATION = (
    Message("system", "You are a helpful assistant."),
    Message("user", "What's the weather in Paris and London?"),
    Message(
        "assistant",
        None,
        tool_calls=(
            ToolCall("call_1", "get_weather", '{"city": "Paris"}'),
            ToolCall("call_2", "get_weather", '{"city":"London","unit":"celsius"}'),
        ),
    ),
    Message("tool", '{"temp": 18, "sky": "cloudy"}', tool_call_id="call_1", name="get_weather"),
    Message("tool", '{"temp": 15, "sky": "rain"}', tool_call_id="call_2"),  # name filled in from the call
    Message("assistant", "Paris is 18°C and cloudy; London is 15°C with rain."),
    Message("user", "Which city is warmer?"),
)


class BareTokenizer:
    """A tokenizer with no chat template and no special tokens."""


def hf_tokenizer(chat_template: str | None, **special: str) -> PreTrainedTokenizerFast:
    """A real transformers tokenizer over a tiny WordLevel vocabulary (no downloads)."""
    model = Tokenizer(WordLevel({"<unk>": 0, "hello": 1, "<s>": 2, "</s>": 3}, unk_token="<unk>"))
    model.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>", **special)  # type: ignore[no-untyped-call]
    tokenizer.chat_template = chat_template
    return tokenizer


def test_builtin_families_are_the_public_names() -> None:
    assert tuple(BUILTIN_TEMPLATES) == FAMILIES
    assert FAMILIES == ("llama3", "qwen", "chatml", "deepseek", "phi4", "mistral", "gemma", "gpt-oss", "generic")


@pytest.mark.parametrize("family", FAMILIES)
def test_golden_prompt(family: str) -> None:
    expected = (GOLDEN / f"{family}.txt").read_text(encoding="utf-8")
    assert render_prompt(BareTokenizer(), CONVERSATION, tools=TOOLS, family=family) == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_minimal_chat_without_tools_or_system(family: str) -> None:
    dicts = messages_to_template_dicts([Message("user", "Hi")])
    prompt = render_builtin(family, dicts)
    assert "Hi" in prompt
    assert "get_weather" not in prompt
    without = render_builtin(family, dicts, add_generation_prompt=False)
    assert prompt.startswith(without)
    if family != "mistral":  # Mistral's prompt ends with [/INST] either way
        assert prompt != without


@pytest.mark.parametrize("family", FAMILIES)
def test_tools_without_system_message(family: str) -> None:
    prompt = render_builtin(family, messages_to_template_dicts([Message("user", "Hi")]), tools=TOOLS)
    assert "get_weather" in prompt and "Hi" in prompt


@pytest.mark.parametrize("family", FAMILIES)
def test_unparseable_arguments_are_rendered_raw(family: str) -> None:
    messages = [Message("user", "Hi"), Message("assistant", None, (ToolCall("c1", "get_weather", "{broken"),))]
    assert "{broken" in render_builtin(family, messages_to_template_dicts(messages), tools=TOOLS)


def test_builtin_uses_tokenizer_bos() -> None:
    class Tok:
        bos_token = "<BOS>"
        eos_token = "<EOS>"

    prompt = render_prompt(Tok(), [Message("user", "Hi")], family="llama3")
    assert prompt.startswith("<BOS><|start_header_id|>system")
    mistral = render_prompt(Tok(), [Message("user", "Hi"), Message("assistant", "Yo")], family="mistral")
    assert mistral == "<BOS>[INST]Hi[/INST]Yo<EOS>"


def test_template_kwargs_reach_builtin() -> None:
    prompt = render_prompt(
        BareTokenizer(),
        [Message("user", "Hi")],
        family="gpt-oss",
        template_kwargs={"reasoning_effort": "high", "current_date": "2025-01-02"},
    )
    assert "Current date: 2025-01-02\n\nReasoning: high" in prompt
    kwargs = {"date_string": "1 Jan"}
    llama = render_prompt(BareTokenizer(), [Message("user", "Hi")], family="llama3", template_kwargs=kwargs)
    assert "Today Date: 1 Jan\n" in llama


def test_messages_to_template_dicts() -> None:
    dicts = messages_to_template_dicts(
        [
            Message("user", None),
            Message("assistant", None, (ToolCall("a", "f", '{"x": [1, 2]}'), ToolCall("b", "g", "not json"))),
            Message("assistant", "text", (ToolCall("c", "h", ""),)),
            Message("tool", "r1", tool_call_id="a"),
            Message("tool", "r2", tool_call_id="b", name="given"),
            Message("tool", "r3", tool_call_id="zzz"),
            Message("assistant", None),
        ]
    )
    assert dicts[0] == {"role": "user", "content": ""}
    assert dicts[1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "f", "arguments": {"x": [1, 2]}}},
            {"id": "b", "type": "function", "function": {"name": "g", "arguments": "not json"}},
        ],
    }
    assert dicts[2]["content"] == "text" and dicts[2]["tool_calls"][0]["function"]["arguments"] == {}
    assert dicts[3] == {"role": "tool", "content": "r1", "tool_call_id": "a", "name": "f"}
    assert dicts[4]["name"] == "given"
    assert "name" not in dicts[5]
    assert dicts[6] == {"role": "assistant", "content": ""}


DETECT_CASES: list[tuple[dict[str, Any], str | None, str]] = [
    ({"model_type": "llama"}, None, "llama3"),
    ({"model_type": "llama"}, "{{ '<|start_header_id|>' }}", "llama3"),
    ({"model_type": "qwen2"}, None, "qwen"),
    ({"model_type": "qwen3"}, "<|im_start|>{{ m }}<|im_end|>", "qwen"),
    ({"model_type": "qwen3_moe"}, None, "qwen"),
    ({"model_type": "deepseek_v3"}, None, "deepseek"),
    ({"model_type": "qwen2"}, "{{'<｜User｜>' + content}}{{'<｜Assistant｜>'}}", "deepseek"),  # R1-Distill-Qwen
    ({"model_type": "llama"}, "{{'<｜Assistant｜>'}}", "deepseek"),  # R1-Distill-Llama
    ({"model_type": "phi3"}, "<|im_start|>system<|im_sep|>", "phi4"),
    ({"model_type": "phi3"}, "<|system|>{{ c }}<|tool|>{{ t }}<|/tool|><|end|>", "phi4"),  # Phi-4-mini
    ({"model_type": "phi3"}, "<|user|>{{ c }}<|end|>", "generic"),  # Phi-3
    ({"model_type": "mistral"}, None, "mistral"),
    ({"model_type": "llama"}, "[INST] {{ c }} [/INST]", "mistral"),
    ({"model_type": "gemma2"}, None, "gemma"),
    ({"model_type": "gemma3"}, "<start_of_turn>user", "gemma"),
    ({"model_type": "gemma3", "text_config": {"model_type": "gemma3_text"}}, None, "gemma"),
    ({"text_config": {"model_type": "gemma3_text"}}, None, "gemma"),
    ({"model_type": "gpt_oss"}, None, "gpt-oss"),
    ({}, "<|start|>system<|message|>...<|channel|>final", "gpt-oss"),
    ({"model_type": "granite"}, "<|im_start|>user", "chatml"),
    ({}, "<|im_start|>{% if tools %}<tool_call>{% endif %}", "qwen"),
    ({"model_type": "unknown_arch"}, None, "generic"),
    ({}, None, "generic"),
]


@pytest.mark.parametrize(("config", "template", "family"), DETECT_CASES)
def test_detect_family(config: dict[str, Any], template: str | None, family: str) -> None:
    assert detect_family(config, template) == family


# -- the tokenizer's own template --------------------------------------------------------------------------

OWN_TEMPLATE = (
    # transformers drops None-valued keys, so a tool-call message's content=None arrives undefined.
    "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content if m.content is defined else 'NONE' }}"
    "{% for c in m.tool_calls or [] %}[{{ c.function.name }} {{ c.function.arguments.city }}]{% endfor %}"
    "{% if m.name %}({{ m.name }}){% endif %}{% endfor %}"
    "{% if tools %}|tools={{ tools | length }}{% endif %}{% if flag is defined %}|flag={{ flag }}{% endif %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_tokenizer_template_is_preferred() -> None:
    tokenizer = hf_tokenizer(OWN_TEMPLATE, bos_token="<s>")
    prompt = render_prompt(tokenizer, CONVERSATION, tools=TOOLS, family="qwen", template_kwargs={"flag": 1})
    assert prompt == (
        "<s><system>You are a helpful assistant.<user>What's the weather in Paris and London?"
        "<assistant>NONE[get_weather Paris][get_weather London]"
        '<tool>{"temp": 18, "sky": "cloudy"}(get_weather)<tool>{"temp": 15, "sky": "rain"}(get_weather)'
        "<assistant>Paris is 18°C and cloudy; London is 15°C with rain."
        "<user>Which city is warmer?|tools=1|flag=1<assistant>"
    )
    no_tools = render_prompt(tokenizer, [Message("user", "hello")])
    assert no_tools == "<s><user>hello<assistant>"


def test_builtin_when_requested_or_tokenizer_has_no_template() -> None:
    golden = (GOLDEN / "qwen.txt").read_text(encoding="utf-8")
    with_own = hf_tokenizer(OWN_TEMPLATE)
    assert render_prompt(with_own, CONVERSATION, tools=TOOLS, family="qwen", use_builtin=True) == golden
    without = hf_tokenizer(None)
    assert render_prompt(without, CONVERSATION, tools=TOOLS, family="qwen") == golden
    # No family named: detected from the tokenizer's template, here the generic one.
    generic = (GOLDEN / "generic.txt").read_text(encoding="utf-8")
    assert render_prompt(without, CONVERSATION, tools=TOOLS) == generic


def test_wrapper_with_own_renderer_is_used() -> None:
    class Wrapper:  # like mlx-lm's TokenizerWrapper with a built-in renderer and no HF template
        chat_template = None
        has_chat_template = True

        def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
            assert kwargs["tokenize"] is False and kwargs["add_generation_prompt"] is True
            return "own:" + messages[-1]["content"]

    assert render_prompt(Wrapper(), [Message("user", "hello")]) == "own:hello"
    assert render_prompt(Wrapper(), [Message("user", "hello")], family="chatml", use_builtin=True).startswith(
        "<|im_start|>user\nhello"
    )


def test_tokenizer_template_error_is_invalid_request() -> None:
    check = "{% if messages[0].role != 'user' %}{{ raise_exception('roles must start with user') }}{% endif %}"
    tokenizer = hf_tokenizer(check)
    with pytest.raises(InvalidRequest, match="roles must start with user"):
        render_prompt(tokenizer, [Message("system", "s"), Message("user", "u")])
    broken = hf_tokenizer("{% for m in messages %}{{ m.content + 1 }}{% endfor %}")
    with pytest.raises(InvalidRequest, match="chat template failed"):
        render_prompt(broken, [Message("user", "u")])
    syntax = hf_tokenizer("{% for %}")
    with pytest.raises(InvalidRequest):
        render_prompt(syntax, [Message("user", "u")])


def test_builtin_errors_are_invalid_request() -> None:
    with pytest.raises(InvalidRequest, match="unknown chat template family"):
        render_prompt(BareTokenizer(), [Message("user", "u")], family="llama2")
    with pytest.raises(InvalidRequest, match="may not set add_generation_prompt"):
        render_prompt(BareTokenizer(), [Message("user", "u")], template_kwargs={"add_generation_prompt": False})
    # A tool whose parameters have no properties mapping: the template fails, the request is invalid.
    bad_tool = [{"type": "function", "function": {"name": "f", "parameters": {"properties": ["x"]}}}]
    with pytest.raises(InvalidRequest, match=r"chat template \(gpt-oss\) failed"):
        render_prompt(BareTokenizer(), [Message("user", "u")], tools=bad_tool, family="gpt-oss")


def test_builtin_templates_are_sandboxed() -> None:
    # The sandbox refuses to mutate values passed in (ImmutableSandboxedEnvironment).
    dicts = messages_to_template_dicts([Message("user", "u")])
    from mlx_router.core import templates

    template = templates._environment().from_string("{{ messages.append(1) }}")
    with pytest.raises(Exception, match=r"unsafe|not safely callable|access"):
        template.render(messages=dicts)
