"""Chat templates: turning a conversation (with tool calls, tool results and offered tools) into prompt text.

The tokenizer's own template comes first; each model family also has a built-in template written from its
documented prompt format, used when the tokenizer has none or the model's config asks for it.
Pure text: no MLX, no model.
"""
# The Jinja templates below are prompt text; their lines follow the prompt, not the code's line length.
# ruff: noqa: E501

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import cache
from types import MappingProxyType
from typing import Any, NoReturn

from jinja2 import Template, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mlx_router.core.errors import InvalidRequest, RouterError
from mlx_router.core.types import Message

FAMILIES = ("llama3", "qwen", "chatml", "deepseek", "phi4", "mistral", "gemma", "gpt-oss", "generic")

_NO_KWARGS: Mapping[str, Any] = MappingProxyType({})
# Names the renderer sets itself, or apply_chat_template options that are not template variables.
_RESERVED = frozenset(
    {"messages", "conversation", "tools", "add_generation_prompt", "tokenize", "chat_template", "return_dict"}
    | {"continue_final_message", "return_tensors", "tokenizer_kwargs", "padding", "truncation", "max_length"}
)

# Shared macros, prepended to every built-in template. Arguments arrive parsed; a string means it did not parse.
_PRELUDE = r"""
{%- macro args_json(a) -%}{%- if a is string -%}{{- a -}}{%- else -%}{{- a | tojson -}}{%- endif -%}{%- endmacro -%}
{%- macro fn_json(t) -%}{{- (t.function if t.function is defined else t) | tojson -}}{%- endmacro -%}
{%- macro call_json(c, key) -%}
{{- '{"name": ' ~ (c.function.name | tojson) ~ ', "' ~ key ~ '": ' ~ args_json(c.function.arguments) ~ '}' -}}
{%- endmacro -%}
{%- macro hermes_assistant(m) -%}
{{- '<|im_start|>assistant\n' ~ (m.content or '') -}}
{%- for c in (m.tool_calls or []) -%}
{%- if m.content or not loop.first -%}{{- '\n' -}}{%- endif -%}
{{- '<tool_call>\n' ~ call_json(c, 'arguments') ~ '\n</tool_call>' -}}
{%- endfor -%}
{{- '<|im_end|>\n' -}}
{%- endmacro -%}
"""

_LLAMA3 = r"""
{%- set ns = namespace(system='', start=0) -%}
{%- if messages and messages[0].role == 'system' -%}{%- set ns.system = messages[0].content or '' -%}{%- set ns.start = 1 -%}{%- endif -%}
{{- (bos_token or '<|begin_of_text|>') ~ '<|start_header_id|>system<|end_header_id|>\n\n' -}}
{%- if tools -%}{{- 'Environment: ipython\n' -}}{%- endif -%}
{{- 'Cutting Knowledge Date: December 2023\n' -}}
{%- if date_string is defined -%}{{- 'Today Date: ' ~ date_string ~ '\n' -}}{%- endif -%}
{{- '\n' ~ ns.system -}}
{%- if tools -%}
{%- if ns.system -%}{{- '\n\n' -}}{%- endif -%}
{{- 'You can call the functions below. To call one, reply with only a JSON object of the form {"name": function name, "parameters": object of argument names and values}. Separate several calls with "; ". Do not use variables.' -}}
{%- for t in tools -%}{{- '\n\n' ~ (t | tojson) -}}{%- endfor -%}
{%- endif -%}
{{- '<|eot_id|>' -}}
{%- for m in messages[ns.start:] -%}
{{- '<|start_header_id|>' ~ ('ipython' if m.role == 'tool' else m.role) ~ '<|end_header_id|>\n\n' ~ (m.content or '') -}}
{%- if m.tool_calls -%}
{%- if m.content -%}{{- '<|python_tag|>' -}}{%- endif -%}
{%- for c in m.tool_calls -%}{{- ('; ' if not loop.first else '') ~ call_json(c, 'parameters') -}}{%- endfor -%}
{%- endif -%}
{{- '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}
"""

_QWEN = r"""
{%- set ns = namespace(start=0) -%}
{%- if messages and messages[0].role == 'system' -%}{%- set ns.start = 1 -%}{%- endif -%}
{%- if tools -%}
{{- '<|im_start|>system\n' -}}
{%- if ns.start -%}{{- (messages[0].content or '') ~ '\n\n' -}}{%- endif -%}
{{- "# Tools\n\nYou may call one or more functions to help with the user's request.\n\nThe available functions are listed as JSON signatures inside <tools></tools> tags:\n<tools>" -}}
{%- for t in tools -%}{{- '\n' ~ (t | tojson) -}}{%- endfor -%}
{{- '\n</tools>\n\nTo call a function, return a JSON object with the function name and its arguments inside <tool_call></tool_call> tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' -}}
{%- elif ns.start -%}
{{- '<|im_start|>system\n' ~ (messages[0].content or '') ~ '<|im_end|>\n' -}}
{%- endif -%}
{%- for m in messages[ns.start:] -%}
{%- if m.role == 'tool' -%}
{%- if loop.first or loop.previtem.role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
{{- '\n<tool_response>\n' ~ (m.content or '') ~ '\n</tool_response>' -}}
{%- if loop.last or loop.nextitem.role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
{%- elif m.role == 'assistant' -%}{{- hermes_assistant(m) -}}
{%- else -%}{{- '<|im_start|>' ~ m.role ~ '\n' ~ (m.content or '') ~ '<|im_end|>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
"""

_CHATML = r"""
{%- set ns = namespace(start=0) -%}
{%- if messages and messages[0].role == 'system' -%}{%- set ns.start = 1 -%}{%- endif -%}
{%- if ns.start or tools -%}
{{- '<|im_start|>system\n' -}}
{%- if ns.start -%}{{- messages[0].content or '' -}}{%- endif -%}
{%- if tools -%}
{%- if ns.start -%}{{- '\n\n' -}}{%- endif -%}
{{- 'You can call functions. Their JSON signatures are inside <tools></tools> tags:\n<tools>' -}}
{%- for t in tools -%}{{- '\n' ~ (t | tojson) -}}{%- endfor -%}
{{- '\n</tools>\nFor each call, reply with <tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- endif -%}
{%- for m in messages[ns.start:] -%}
{%- if m.role == 'tool' -%}{{- '<|im_start|>tool\n<tool_response>\n' ~ (m.content or '') ~ '\n</tool_response><|im_end|>\n' -}}
{%- elif m.role == 'assistant' -%}{{- hermes_assistant(m) -}}
{%- else -%}{{- '<|im_start|>' ~ m.role ~ '\n' ~ (m.content or '') ~ '<|im_end|>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
"""

_DEEPSEEK = r"""
{%- set ns = namespace(system='', outputs=false) -%}
{%- for m in messages if m.role == 'system' -%}{%- set ns.system = ns.system ~ ('\n\n' if ns.system else '') ~ (m.content or '') -%}{%- endfor -%}
{{- (bos_token or '<｜begin▁of▁sentence｜>') ~ ns.system -}}
{%- if tools -%}
{%- if ns.system -%}{{- '\n\n' -}}{%- endif -%}
{{- '## Tools\n\nYou can call these functions:' -}}
{%- for t in tools -%}
{%- set f = t.function if t.function is defined else t -%}
{{- '\n\n### ' ~ f.name ~ '\nDescription: ' ~ (f.description or '') ~ '\nParameters: ' ~ ((f.parameters or {}) | tojson) -}}
{%- endfor -%}
{{- '\n\nTo call functions, always use exactly this format, with one <｜tool▁call▁begin｜> entry per call:\n<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>FUNCTION_NAME\n```json\nARGUMENTS_JSON\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>' -}}
{%- endif -%}
{%- for m in messages if m.role != 'system' -%}
{%- if m.role == 'tool' -%}
{{- ('\n' if ns.outputs else '<｜tool▁outputs▁begin｜>') ~ '<｜tool▁output▁begin｜>' ~ (m.content or '') ~ '<｜tool▁output▁end｜>' -}}
{%- set ns.outputs = true -%}
{%- else -%}
{%- if ns.outputs -%}{{- '<｜tool▁outputs▁end｜>' -}}{%- endif -%}
{%- if m.role == 'assistant' -%}
{%- if not ns.outputs -%}{{- '<｜Assistant｜>' -}}{%- endif -%}
{{- m.content or '' -}}
{%- if m.tool_calls -%}
{{- '<｜tool▁calls▁begin｜>' -}}
{%- for c in m.tool_calls -%}
{{- ('\n' if not loop.first else '') ~ '<｜tool▁call▁begin｜>function<｜tool▁sep｜>' ~ c.function.name ~ '\n```json\n' ~ args_json(c.function.arguments) ~ '\n```<｜tool▁call▁end｜>' -}}
{%- endfor -%}
{{- '<｜tool▁calls▁end｜>' -}}
{%- endif -%}
{{- '<｜end▁of▁sentence｜>' -}}
{%- else -%}{{- '<｜User｜>' ~ (m.content or '') -}}
{%- endif -%}
{%- set ns.outputs = false -%}
{%- endif -%}
{%- endfor -%}
{%- if ns.outputs -%}{{- '<｜tool▁outputs▁end｜>' -}}
{%- elif add_generation_prompt -%}{{- '<｜Assistant｜>' -}}{%- endif -%}
"""

_PHI4 = r"""
{%- set ns = namespace(start=0) -%}
{%- if messages and messages[0].role == 'system' -%}{%- set ns.start = 1 -%}{%- endif -%}
{%- if ns.start or tools -%}
{{- '<|im_start|>system<|im_sep|>' -}}
{%- if ns.start -%}{{- messages[0].content or '' -}}{%- endif -%}
{%- if tools -%}
{{- '<|tool|>[' -}}{%- for t in tools -%}{{- (', ' if not loop.first else '') ~ fn_json(t) -}}{%- endfor -%}{{- ']<|/tool|>' -}}
{%- endif -%}
{{- '<|im_end|>' -}}
{%- endif -%}
{%- for m in messages[ns.start:] -%}
{{- '<|im_start|>' ~ m.role ~ '<|im_sep|>' ~ (m.content or '') -}}
{%- if m.tool_calls -%}
{{- '<|tool_call|>[' -}}{%- for c in m.tool_calls -%}{{- (', ' if not loop.first else '') ~ call_json(c, 'arguments') -}}{%- endfor -%}{{- ']<|/tool_call|>' -}}
{%- endif -%}
{{- '<|im_end|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant<|im_sep|>' -}}{%- endif -%}
"""

# Mistral v3 layout: the system prompt and the tool list go with the LAST user message.
_MISTRAL = r"""
{%- set ns = namespace(system='', last_user=-1) -%}
{%- for m in messages -%}
{%- if m.role == 'system' -%}{%- set ns.system = ns.system ~ ('\n\n' if ns.system else '') ~ (m.content or '') -%}{%- endif -%}
{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{{- bos_token or '<s>' -}}
{%- for m in messages -%}
{%- if m.role == 'user' -%}
{%- if loop.index0 == ns.last_user -%}
{%- if tools -%}{{- '[AVAILABLE_TOOLS]' ~ (tools | tojson) ~ '[/AVAILABLE_TOOLS]' -}}{%- endif -%}
{{- '[INST]' ~ ((ns.system ~ '\n\n') if ns.system else '') ~ (m.content or '') ~ '[/INST]' -}}
{%- else -%}{{- '[INST]' ~ (m.content or '') ~ '[/INST]' -}}
{%- endif -%}
{%- elif m.role == 'assistant' -%}
{{- m.content or '' -}}
{%- if m.tool_calls -%}
{{- '[TOOL_CALLS][' -}}
{%- for c in m.tool_calls -%}
{{- (', ' if not loop.first else '') ~ '{"name": ' ~ (c.function.name | tojson) ~ ', "arguments": ' ~ args_json(c.function.arguments) ~ ', "id": ' ~ (c.id | tojson) ~ '}' -}}
{%- endfor -%}
{{- ']' -}}
{%- endif -%}
{{- eos_token or '</s>' -}}
{%- elif m.role == 'tool' -%}
{{- '[TOOL_RESULTS]' ~ ({'content': m.content or '', 'call_id': m.tool_call_id} | tojson) ~ '[/TOOL_RESULTS]' -}}
{%- endif -%}
{%- endfor -%}
"""

# Gemma has no system role: system text and the tool description open the first user turn.
_GEMMA = r"""
{%- set ns = namespace(prefix='', done=false) -%}
{%- for m in messages if m.role == 'system' -%}{%- set ns.prefix = ns.prefix ~ (m.content or '') ~ '\n\n' -%}{%- endfor -%}
{%- if tools -%}
{%- set ns.prefix = ns.prefix ~ 'You can call the functions listed below. To call functions, reply with a ```tool_code block holding one Python call per line, for example:\n```tool_code\nfunction_name(argument="value")\n```\nFunction results come back in ```tool_output blocks.' -%}
{%- for t in tools -%}{%- set ns.prefix = ns.prefix ~ '\n\n' ~ (t | tojson) -%}{%- endfor -%}
{%- set ns.prefix = ns.prefix ~ '\n\n' -%}
{%- endif -%}
{{- bos_token or '<bos>' -}}
{%- for m in messages if m.role != 'system' -%}
{%- if m.role == 'tool' -%}
{{- ('<start_of_turn>user\n' if loop.first or loop.previtem.role != 'tool' else '\n') ~ '```tool_output\n' ~ (m.content or '') ~ '\n```' -}}
{%- if loop.last or loop.nextitem.role != 'tool' -%}{{- '<end_of_turn>\n' -}}{%- endif -%}
{%- elif m.role == 'assistant' -%}
{{- '<start_of_turn>model\n' ~ (m.content or '') -}}
{%- if m.tool_calls -%}
{{- ('\n' if m.content else '') ~ '```tool_code\n' -}}
{%- for c in m.tool_calls -%}
{{- c.function.name ~ '(' -}}
{%- if c.function.arguments is mapping -%}
{%- for k, v in c.function.arguments.items() -%}{{- (', ' if not loop.first else '') ~ k ~ '=' ~ (v | tojson) -}}{%- endfor -%}
{%- else -%}{{- c.function.arguments -}}
{%- endif -%}
{{- ')\n' -}}
{%- endfor -%}
{{- '```' -}}
{%- endif -%}
{{- '<end_of_turn>\n' -}}
{%- else -%}
{{- '<start_of_turn>user\n' ~ ('' if ns.done else ns.prefix) ~ (m.content or '') ~ '<end_of_turn>\n' -}}
{%- set ns.done = true -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}
"""

# gpt-oss harmony: tools are declared as a TypeScript-like namespace in the developer message.
_GPT_OSS = r"""
{%- macro ts_type(p) -%}
{%- if p.enum is defined -%}{%- for e in p.enum -%}{{- (' | ' if not loop.first else '') ~ (e | tojson) -}}{%- endfor -%}
{%- elif p.type == 'string' -%}{{- 'string' -}}
{%- elif p.type in ('integer', 'number') -%}{{- 'number' -}}
{%- elif p.type == 'boolean' -%}{{- 'boolean' -}}
{%- elif p.type == 'array' -%}{{- (ts_type(p['items']) if p['items'] is defined else 'any') ~ '[]' -}}
{%- elif p.type == 'object' -%}{{- 'object' -}}
{%- else -%}{{- 'any' -}}
{%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(system='') -%}
{%- for m in messages if m.role == 'system' -%}{%- set ns.system = ns.system ~ ('\n\n' if ns.system else '') ~ (m.content or '') -%}{%- endfor -%}
{{- '<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2024-06\n' -}}
{%- if current_date is defined -%}{{- 'Current date: ' ~ current_date ~ '\n' -}}{%- endif -%}
{{- '\nReasoning: ' ~ (reasoning_effort if reasoning_effort is defined else 'medium') -}}
{{- '\n\n# Valid channels: analysis, commentary, final. Channel must be included for every message.' -}}
{%- if tools -%}{{- "\nCalls to these tools must go to the commentary channel: 'functions'." -}}{%- endif -%}
{{- '<|end|>' -}}
{%- if ns.system or tools -%}
{{- '<|start|>developer<|message|>' -}}
{%- if ns.system -%}{{- '# Instructions\n\n' ~ ns.system -}}{%- endif -%}
{%- if tools -%}
{{- ('\n\n' if ns.system else '') ~ '# Tools\n\n## functions\n\nnamespace functions {\n\n' -}}
{%- for t in tools -%}
{%- set f = t.function if t.function is defined else t -%}
{%- if f.description -%}{{- '// ' ~ f.description ~ '\n' -}}{%- endif -%}
{%- set props = (f.parameters or {}).properties or {} -%}
{%- if props -%}
{{- 'type ' ~ f.name ~ ' = (_: {\n' -}}
{%- for k, p in props.items() -%}
{%- if p.description -%}{{- '// ' ~ p.description ~ '\n' -}}{%- endif -%}
{{- k ~ ('' if k in (f.parameters.required or []) else '?') ~ ': ' ~ ts_type(p) ~ ',' -}}
{%- if p.default is defined -%}{{- ' // default: ' ~ (p.default | tojson) -}}{%- endif -%}
{{- '\n' -}}
{%- endfor -%}
{{- '}) => any;\n\n' -}}
{%- else -%}{{- 'type ' ~ f.name ~ ' = () => any;\n\n' -}}
{%- endif -%}
{%- endfor -%}
{{- '} // namespace functions' -}}
{%- endif -%}
{{- '<|end|>' -}}
{%- endif -%}
{%- for m in messages if m.role != 'system' -%}
{%- if m.role == 'assistant' -%}
{%- if m.content -%}
{{- '<|start|>assistant<|channel|>' ~ ('commentary' if m.tool_calls else 'final') ~ '<|message|>' ~ m.content ~ '<|end|>' -}}
{%- endif -%}
{%- for c in (m.tool_calls or []) -%}
{{- '<|start|>assistant<|channel|>commentary to=functions.' ~ c.function.name ~ ' <|constrain|>json<|message|>' ~ args_json(c.function.arguments) ~ '<|call|>' -}}
{%- endfor -%}
{%- elif m.role == 'tool' -%}
{{- '<|start|>functions.' ~ (m.name or 'unknown') ~ ' to=assistant<|channel|>commentary<|message|>' ~ (m.content or '') ~ '<|end|>' -}}
{%- else -%}{{- '<|start|>' ~ m.role ~ '<|message|>' ~ (m.content or '') ~ '<|end|>' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|start|>assistant' -}}{%- endif -%}
"""

_GENERIC = r"""
{%- set ns = namespace(start=0) -%}
{%- if messages and messages[0].role == 'system' -%}
{{- '### System\n' ~ (messages[0].content or '') ~ '\n\n' -}}{%- set ns.start = 1 -%}
{%- endif -%}
{%- if tools -%}
{{- '### Tools\nYou can call these functions. To call one, reply with <tool_call>{"name": "function name", "arguments": {argument names and values}}</tool_call>, one tag per call.' -}}
{%- for t in tools -%}{{- '\n' ~ (t | tojson) -}}{%- endfor -%}
{{- '\n\n' -}}
{%- endif -%}
{%- for m in messages[ns.start:] -%}
{%- if m.role == 'tool' -%}
{{- '### Tool result (' ~ (m.name or 'tool') ~ ', ' ~ (m.tool_call_id or '') ~ ')\n' ~ (m.content or '') ~ '\n\n' -}}
{%- elif m.role == 'assistant' -%}
{{- '### Assistant\n' ~ (m.content or '') -}}
{%- for c in (m.tool_calls or []) -%}
{{- ('\n' if m.content or not loop.first else '') ~ '<tool_call>' ~ call_json(c, 'arguments') ~ '</tool_call>' -}}
{%- endfor -%}
{{- '\n\n' -}}
{%- else -%}{{- '### ' ~ (m.role | capitalize) ~ '\n' ~ (m.content or '') ~ '\n\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '### Assistant\n' -}}{%- endif -%}
"""

BUILTIN_TEMPLATES: Mapping[str, str] = MappingProxyType(
    dict(zip(FAMILIES, (_LLAMA3, _QWEN, _CHATML, _DEEPSEEK, _PHI4, _MISTRAL, _GEMMA, _GPT_OSS, _GENERIC), strict=True))
)


def _tojson(value: Any, indent: int | None = None) -> str:
    # Like transformers' filter: keep key order and non-ASCII text (Jinja's own sorts keys and escapes HTML).
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _raise_exception(message: str) -> NoReturn:
    raise TemplateError(message)


@cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return env


@cache
def _compiled(family: str) -> Template:
    return _environment().from_string(_PRELUDE + BUILTIN_TEMPLATES[family])


# Template markers, most distinctive first: a fine-tune's template says more than its architecture
# (e.g. DeepSeek-R1-Distill-Qwen has model_type qwen2 but DeepSeek's prompt format).
_MARKERS: tuple[tuple[str, str], ...] = (
    ("<|channel|>", "gpt-oss"),
    ("<｜Assistant｜>", "deepseek"),
    ("<｜tool▁calls▁begin｜>", "deepseek"),
    ("<|im_sep|>", "phi4"),
    ("<|tool_call|>", "phi4"),
    ("<|start_header_id|>", "llama3"),
    ("<start_of_turn>", "gemma"),
    ("[INST]", "mistral"),
    ("[TOOL_CALLS]", "mistral"),
    ("<tool_call>", "qwen"),
)

_MODEL_TYPES: Mapping[str, str] = MappingProxyType(
    {"llama": "llama3", "llama4": "llama3", "deepseek_v2": "deepseek", "deepseek_v3": "deepseek", "gpt_oss": "gpt-oss"}
    | dict.fromkeys(("qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "qwen3_next"), "qwen")
    | dict.fromkeys(("mistral", "mistral3", "mixtral", "ministral"), "mistral")
    | dict.fromkeys(("gemma", "gemma2", "gemma3", "gemma3_text"), "gemma")
)


def detect_family(model_config: Mapping[str, Any], chat_template: str | None) -> str:
    """Guess the model family (one of FAMILIES) from config.json's `model_type` and the tokenizer's template.

    Distinctive template markers win over `model_type`; phi3-architecture models count as phi4 only with
    Phi-4 markers; a plain `<|im_start|>` template is chatml (qwen for Qwen architectures). Default "generic".
    """
    template = chat_template or ""
    text_config = model_config.get("text_config")
    model_type = str(model_config.get("model_type") or "").lower()
    if not model_type and isinstance(text_config, Mapping):
        model_type = str(text_config.get("model_type") or "").lower()
    for marker, family in _MARKERS:
        if marker in template:
            return family
    by_type = _MODEL_TYPES.get(model_type)
    if "<|im_start|>" in template:
        return "qwen" if by_type == "qwen" else "chatml"
    if model_type.startswith("phi4") or (model_type == "phi3" and "<|tool|>" in template):
        return "phi4"
    return by_type or "generic"


def _arguments(raw: str) -> Any:
    """Tool-call arguments for a template: the parsed JSON object, else the raw string as given."""
    if not raw.strip():
        return {}
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError:
        return raw
    return parsed if isinstance(parsed, dict) else raw


def messages_to_template_dicts(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Convert messages to the HF chat-template shape.

    Tool-call arguments are parsed objects (templates serialise them). `content` stays None only on an
    assistant message that carries tool calls (templates such as DeepSeek's test `content is none` there);
    elsewhere None becomes "" so templates that concatenate content do not fail. `tool_calls` is present only
    when non-empty (templates test `'tool_calls' in message`). A tool message without a name gets the name of
    the call it answers.
    """
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for message in messages:
        content = message.content
        if content is None and not message.tool_calls:
            content = ""
        item: dict[str, Any] = {"role": message.role, "content": content}
        if message.tool_calls:
            item["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
                for c in message.tool_calls
            ]
            names.update((c.id, c.name) for c in message.tool_calls)
        if message.role == "tool":
            if message.tool_call_id is not None:
                item["tool_call_id"] = message.tool_call_id
            name = message.name or names.get(message.tool_call_id or "")
            if name:
                item["name"] = name
        elif message.name:
            item["name"] = message.name
        out.append(item)
    return out


def render_builtin(
    family: str,
    messages: Sequence[dict[str, Any]],
    *,
    tools: Sequence[dict[str, Any]] = (),
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    template_kwargs: Mapping[str, Any] = _NO_KWARGS,
) -> str:
    """Render template dicts (see `messages_to_template_dicts`) with a family's built-in template."""
    if family not in BUILTIN_TEMPLATES:
        raise InvalidRequest(f"unknown chat template family {family!r}; expected one of {', '.join(FAMILIES)}")
    _check_kwargs(template_kwargs)
    try:
        return _compiled(family).render(
            messages=list(messages),
            tools=list(tools),
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **template_kwargs,
        )
    except Exception as exc:  # anything a template raises is a problem with the conversation, not the server
        raise InvalidRequest(f"chat template ({family}) failed: {exc}") from exc


def _check_kwargs(template_kwargs: Mapping[str, Any]) -> None:
    clash = sorted(_RESERVED.intersection(template_kwargs))
    if clash:
        raise InvalidRequest(f"chat_template_kwargs may not set {', '.join(clash)}", param="chat_template_kwargs")


def render_prompt(
    tokenizer: Any,
    messages: Sequence[Message],
    *,
    tools: Sequence[dict[str, Any]] = (),
    family: str | None = None,
    use_builtin: bool = False,
    template_kwargs: Mapping[str, Any] = _NO_KWARGS,
) -> str:
    """Render the prompt text for a chat, with generation prompt.

    The tokenizer's own chat template (an HF tokenizer's `chat_template`, or whatever an mlx-lm TokenizerWrapper
    reports in `has_chat_template`) is used unless `use_builtin` is set or it has none; then the built-in
    template of `family` (detected from the tokenizer's template when None) is used. Template failures raise
    InvalidRequest. The result already holds any BOS token: tokenize it without adding special tokens.
    """
    dicts = messages_to_template_dicts(messages)
    _check_kwargs(template_kwargs)
    own = getattr(tokenizer, "chat_template", None)
    # mlx-lm's TokenizerWrapper also counts its own template renderers, which leave chat_template unset.
    has_own = getattr(tokenizer, "has_chat_template", None)
    if (has_own if isinstance(has_own, bool) else bool(own)) and not use_builtin:
        try:
            prompt = tokenizer.apply_chat_template(
                dicts, tools=list(tools) or None, add_generation_prompt=True, tokenize=False, **template_kwargs
            )
        except RouterError:
            raise
        except Exception as exc:  # a template's raise_exception(), a missing key, a type error...
            raise InvalidRequest(f"chat template failed: {exc}") from exc
        if not isinstance(prompt, str):
            raise InvalidRequest("chat template did not render to text")
        return prompt
    chosen = family or detect_family({}, own if isinstance(own, str) else None)
    return render_builtin(
        chosen,
        dicts,
        tools=tools,
        bos_token=_special(tokenizer, "bos_token"),
        eos_token=_special(tokenizer, "eos_token"),
        template_kwargs=template_kwargs,
    )


def _special(tokenizer: Any, attr: str) -> str | None:
    value = getattr(tokenizer, attr, None)
    return value if isinstance(value, str) and value else None
