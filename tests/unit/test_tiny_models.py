"""The tiny model builders: loadable by mlx-lm, and scripted replies replay byte for byte."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm import generate, load, stream_generate
from mlx_lm.generate import BatchGenerator

from helper_tools.tiny_models import (
    ASSISTANT_PROMPT_TOKEN,
    CHATML,
    DEMO_REPLY,
    EOS_TOKEN,
    LLAMA3,
    ChatFormat,
    build_random_model,
    build_scripted_model,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hi there"}],
    [
        {"role": "system", "content": "You are terse. Answer in one line."},
        {"role": "user", "content": "What's the weather?\nassistant"},
    ],
    [
        {"role": "user", "content": "Tell me a story"},
        {"role": "assistant", "content": "the cat and the dog"},
        {"role": "user", "content": [{"type": "text", "text": "Again, héllo ✓"}]},
    ],
]

REPLIES = [
    "Hello world, this is a scripted reply.",
    "the cat and the dog and the bird",
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    "héllo wörld ✓",
    "Łódź: a  b , c!! ¡olé! 日本語 🙂 ",
    "\nline one\n\nline two\n",
    "",
]


# An agent loop's second turn: the tool result is in the prompt.
TOOL_TURN: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"a": 1}}}],
    },
    {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def _prompt(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
    assert isinstance(ids, list)
    return ids


def _batch_generate(model: Any, tokenizer: Any, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy tokens (EOS included) for each prompt, decoded together by mlx-lm's BatchGenerator."""
    gen = BatchGenerator(model, stop_tokens=[[tokenizer.eos_token_id]])
    try:
        uids = gen.insert(prompts, max_tokens=[max_tokens] * len(prompts))
        tokens: dict[int, list[int]] = {uid: [] for uid in uids}
        done: set[int] = set()
        while len(done) < len(uids):
            _, responses = gen.next()
            for r in responses:
                tokens[r.uid].append(r.token)
                if r.finish_reason is not None:
                    assert r.finish_reason == "stop"
                    done.add(r.uid)
    finally:
        gen.close()
    return [tokens[uid] for uid in uids]


def test_random_model_loads_and_generates(tmp_path: Path) -> None:
    path = build_random_model(tmp_path / "rand", max_position_embeddings=512)
    config = json.loads((path / "config.json").read_text())
    model, tokenizer = load(str(path))

    assert config["model_type"] == "llama"
    assert config["max_position_embeddings"] == 512
    assert config["vocab_size"] == len(tokenizer) and 500 <= len(tokenizer) <= 1000
    assert config["eos_token_id"] == tokenizer.convert_tokens_to_ids(EOS_TOKEN) == tokenizer.eos_token_id
    assert tokenizer.eos_token_ids == {config["eos_token_id"]}
    assert type(tokenizer.detokenizer).__name__ == "BPEStreamingDetokenizer"
    assert tokenizer.has_tool_calling and tokenizer.tool_call_start == "<tool_call>"

    prompt = _prompt(tokenizer, CONVERSATIONS[0])
    text = tokenizer.decode(prompt)
    assert text == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    tokens = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=8)]
    assert 1 <= len(tokens) <= 8
    assert isinstance(generate(model, tokenizer, prompt, max_tokens=8), str)


def test_random_model_is_deterministic(tmp_path: Path) -> None:
    a = build_random_model(tmp_path / "a", seed=3)
    b = build_random_model(tmp_path / "b", seed=3)
    c = build_random_model(tmp_path / "c", seed=4)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_random_model_dtype(tmp_path: Path) -> None:
    path = build_random_model(tmp_path / "bf16", dtype="bfloat16", num_layers=1)
    weights = mx.load(str(path / "model.safetensors"))
    assert isinstance(weights, dict)
    assert {w.dtype for w in weights.values()} == {mx.bfloat16}


@pytest.mark.parametrize("reply", REPLIES)
def test_scripted_model_replays_reply(tmp_path: Path, reply: str) -> None:
    model, tokenizer = load(str(build_scripted_model(tmp_path / "m", reply)))
    eos_id = tokenizer.eos_token_id
    for messages in CONVERSATIONS:
        prompt = _prompt(tokenizer, messages)
        assert prompt[-1] == tokenizer.convert_tokens_to_ids(ASSISTANT_PROMPT_TOKEN)

        responses = list(stream_generate(model, tokenizer, prompt, max_tokens=200))
        segments = [r.text for r in responses]
        assert "".join(segments) == reply
        assert responses[-1].finish_reason == "stop"
        assert responses[-1].token == eos_id
        generated = [r.token for r in responses[:-1]]
        assert eos_id not in generated
        assert tokenizer.decode(generated) == reply
        if len(reply.split()) > 1:
            assert len(generated) > 1 and sum(1 for s in segments if s) > 1
        if reply.startswith("<tool_call>"):  # tags stay whole, as with real tool-calling models
            assert segments[0] == "<tool_call>" and segments[-2] == "\n</tool_call>"

        assert generate(model, tokenizer, prompt, max_tokens=200) == reply


def test_scripted_model_batched(tmp_path: Path) -> None:
    reply = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    model, tokenizer = load(str(build_scripted_model(tmp_path / "m", reply)))
    prompts = [_prompt(tokenizer, c) for c in CONVERSATIONS[:2]]
    assert len(prompts[0]) != len(prompts[1])  # exercises left padding
    for tokens in _batch_generate(model, tokenizer, prompts, 100):
        assert tokens[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(tokens[:-1]) == reply


def test_scripted_model_long_reply(tmp_path: Path) -> None:
    # More pieces than hidden dimensions: the embeddings can no longer be orthogonal.
    reply = " ".join(f"word{i % 37} and more" for i in range(60))
    model, tokenizer = load(str(build_scripted_model(tmp_path / "m", reply, hidden_size=32)))
    prompt = _prompt(tokenizer, CONVERSATIONS[1])
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=1000))
    assert "".join(r.text for r in responses) == reply
    assert responses[-1].finish_reason == "stop" and len(responses) > 32 + 1


def test_scripted_model_length_limit_and_config(tmp_path: Path) -> None:
    reply = "one two three four five"
    path = build_scripted_model(tmp_path / "m", reply, max_position_embeddings=256)
    config = json.loads((path / "config.json").read_text())
    assert config["max_position_embeddings"] == 256
    assert json.loads((path / "tokenizer_config.json").read_text())["model_max_length"] == 256
    model, tokenizer = load(str(path))
    assert config["vocab_size"] == len(tokenizer)
    responses = list(stream_generate(model, tokenizer, _prompt(tokenizer, CONVERSATIONS[0]), max_tokens=2))
    assert responses[-1].finish_reason == "length"
    assert "".join(r.text for r in responses) == "one two"


@pytest.mark.parametrize("reply", [" leading space", "say <|im_end|> now"])
def test_scripted_model_rejects_unreplayable_replies(tmp_path: Path, reply: str) -> None:
    with pytest.raises(ValueError):
        build_scripted_model(tmp_path / "m", reply)


AGENT_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
AGENT_ANSWER = "It is 21 C in Paris: sunny, as the tool said."


@pytest.mark.parametrize("fmt", [CHATML, LLAMA3], ids=["chatml", "llama3"])
@pytest.mark.parametrize(
    ("reply", "final"),
    [
        (AGENT_CALL, AGENT_ANSWER),
        ("the cat and the dog", "the cat and the bird"),  # shared words: the pieces are kept apart
        ("Same answer.", "Same answer."),
        ("Something.", ""),
    ],
)
def test_scripted_model_switches_script_once_the_marker_is_in_context(
    tmp_path: Path, fmt: ChatFormat, reply: str, final: str
) -> None:
    path = build_scripted_model(tmp_path / "m", reply, after_marker=(fmt.tool_result_marker, final), chat_format=fmt)
    model, tokenizer = load(str(path))
    config = json.loads((path / "config.json").read_text())
    assert config["eos_token_id"] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids(fmt.eos_token)
    marker = tokenizer.convert_tokens_to_ids(fmt.tool_result_marker)
    follow_up = [{"role": "assistant", "content": "Noted."}, {"role": "user", "content": "And now?"}]
    cases = [(c, None, False) for c in CONVERSATIONS]
    cases += [(CONVERSATIONS[0], TOOLS, False), (TOOL_TURN, TOOLS, True), ([*TOOL_TURN, *follow_up], None, True)]
    for messages, tools, marked in cases:
        prompt = _prompt(tokenizer, messages, tools)
        assert prompt[-1] == tokenizer.convert_tokens_to_ids(fmt.generation_prompt)
        assert (marker in prompt) == marked
        expected = final if marked else reply
        responses = list(stream_generate(model, tokenizer, prompt, max_tokens=100))
        assert "".join(r.text for r in responses) == expected
        assert responses[-1].finish_reason == "stop" and responses[-1].token == tokenizer.eos_token_id
        assert tokenizer.decode([r.token for r in responses[:-1]]) == expected


def test_scripted_model_branch_holds_at_any_prompt_length_in_a_batch(tmp_path: Path) -> None:
    window = 2048
    path = build_scripted_model(tmp_path / "m", AGENT_CALL, after_marker=("<tool_response>", AGENT_ANSWER))
    model, tokenizer = load(str(path))
    room = window - 40  # the prompt, and the longest reply with its EOS, fit in the window

    def padded(messages: list[dict[str, Any]]) -> list[int]:
        """``messages`` with a user message of filler words first, as long as fits in ``room``."""
        base = len(_prompt(tokenizer, [{"role": "user", "content": ""}, *messages]))
        filler = " ".join(["the"] * (room - base - 4))  # one token a word, give or take at the edges
        prompt = _prompt(tokenizer, [{"role": "user", "content": filler}, *messages])
        assert room - 8 <= len(prompt) <= room
        return prompt

    tool_first = [TOOL_TURN[2], {"role": "user", "content": "the" + " the" * 1950}]  # marker, then ~2000 tokens
    prompts = [
        _prompt(tokenizer, CONVERSATIONS[0]),
        _prompt(tokenizer, TOOL_TURN),
        padded([{"role": "user", "content": "Hi"}]),
        padded(TOOL_TURN),
        _prompt(tokenizer, tool_first),
    ]
    assert room - 100 < len(prompts[-1]) <= room
    expected = [AGENT_CALL, AGENT_ANSWER, AGENT_CALL, AGENT_ANSWER, AGENT_ANSWER]
    for prompt, reply, tokens in zip(prompts, expected, _batch_generate(model, tokenizer, prompts, 100), strict=True):
        assert tokenizer.decode(tokens[:-1]) == reply and tokens[-1] == tokenizer.eos_token_id
        assert generate(model, tokenizer, prompt, max_tokens=100) == reply


@pytest.mark.parametrize(
    ("reply", "after_marker", "kwargs"),
    [
        ("Use <tool_response> here.", ("<tool_response>", "Done."), {}),  # the marker in a reply
        ("Call.", ("", "Done."), {}),
        ("Call.", (ASSISTANT_PROMPT_TOKEN, "Done."), {}),
        ("Call.", ("<tool_response>", " Done."), {}),
        ("Hi", ("<tool_response>", "Hi"), {}),  # one piece, the same in both replies
        ("Wow!!", ("!!DONE", "Done."), {}),  # the piece "!!" would split "Wow!!DONE" wrongly
        ("Call.", ("<tool_response>", "Done."), {"dtype": "float16"}),
        (" ".join(f"w{i}" for i in range(20)), ("<tool_response>", "Done."), {"hidden_size": 16}),
    ],
)
def test_scripted_model_rejects_unreplayable_branches(
    tmp_path: Path, reply: str, after_marker: tuple[str, str], kwargs: dict[str, Any]
) -> None:
    with pytest.raises(ValueError):
        build_scripted_model(tmp_path / "m", reply, after_marker=after_marker, **kwargs)


def test_demo_cli(tmp_path: Path) -> None:
    cli = [sys.executable, "helper_tools/tiny_models.py", "--model-dir", str(tmp_path), "--name", "demo"]
    args = ["--after-marker", "<tool_response>", "The tool answered."]
    result = subprocess.run([*cli, *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert str(tmp_path / "demo") in result.stdout
    model, tokenizer = load(str(tmp_path / "demo"))
    assert generate(model, tokenizer, _prompt(tokenizer, CONVERSATIONS[0]), max_tokens=100) == DEMO_REPLY
    assert generate(model, tokenizer, _prompt(tokenizer, TOOL_TURN), max_tokens=100) == "The tool answered."
