"""Tiny, fully local MLX model folders for tests, demos and benchmarks.

Every builder writes a folder that ``mlx_lm.load`` accepts: a Llama
``config.json``, ``model.safetensors``, a byte-level BPE ``tokenizer.json``
trained here on a built-in corpus, and a ``tokenizer_config.json`` with a
chat template: ChatML with Qwen-style tool calls (so mlx-lm infers the
``json_tools`` parser), or for scripted models optionally Llama 3 style
(:data:`LLAMA3`).

* :func:`build_random_model` - random weights; output is gibberish.
* :func:`build_scripted_model` - greedy decoding after any chat prompt emits a
  fixed reply, then EOS; optionally a second reply once a marker token (such
  as the one that opens a tool result) is in the prompt, for agent loops.
* :func:`build_demo_model` - a scripted model with a friendly reply, also
  available as ``python helper_tools/tiny_models.py --model-dir DIR``.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.llama import Model, ModelArgs
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

if __package__:
    from .scripted_weights import LlamaShape, scripted_weights
else:  # run as a script: python helper_tools/tiny_models.py
    from scripted_weights import LlamaShape, scripted_weights  # type: ignore[no-redef]

__all__ = [
    "ASSISTANT_PROMPT_TOKEN",
    "BOS_TOKEN",
    "CHATML",
    "CHATML_TEMPLATE",
    "DEMO_REPLY",
    "EOS_TOKEN",
    "LLAMA3",
    "LLAMA3_TEMPLATE",
    "PAD_TOKEN",
    "ChatFormat",
    "build_demo_model",
    "build_random_model",
    "build_scripted_model",
]

BOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
IM_START = "<|im_start|>"
# Scripted models only: one special token for the whole generation prompt, so the
# last prompt token is the same id for every conversation and no reply piece
# (an added token) can change how the generation prompt is split.
ASSISTANT_PROMPT_TOKEN = "<|im_start|>assistant\n"
SPECIAL_TOKENS = (BOS_TOKEN, IM_START, EOS_TOKEN)
DEMO_REPLY = "Hello from mlx-router! This reply comes from a tiny scripted demo model."

# Message text: a string, or the text parts of a content list.
_TEXT_MACRO = (
    "{% macro text(content) %}"
    "{% if content is string %}{{ content }}"
    "{% elif content %}{% for part in content if part.type == 'text' %}{{ part.text }}{% endfor %}"
    "{% endif %}"
    "{% endmacro %}"
)

CHATML_TEMPLATE = _TEXT_MACRO + (
    "{% set msgs = messages %}"
    "{% if tools or messages[0].role == 'system' %}"
    "<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ text(messages[0].content) }}{% set msgs = messages[1:] %}"
    "{% else %}You are a helpful assistant.{% endif %}"
    "{% if tools %}{{ '\\n\\n' }}# Tools\n\nYou may call functions. Their signatures:\n<tools>"
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}{{ '\\n' }}</tools>\n\n"
    "To call one, reply with:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    "{% endif %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% for m in msgs %}"
    "{% if m.role == 'tool' %}"
    "<|im_start|>user\n<tool_response>\n{{ text(m.content) }}\n</tool_response><|im_end|>\n"
    "{% else %}"
    "<|im_start|>{{ m.role }}\n{{ text(m.content) }}"
    "{% for call in m.tool_calls or [] %}"
    "{% set tool_call = call.function if call.function is defined else call %}"
    "{% if text(m.content) or not loop.first %}{{ '\\n' }}{% endif %}"
    '<tool_call>\n{"name": "{{ tool_call.name }}", "arguments": '
    "{% if tool_call.arguments is string %}{{ tool_call.arguments }}"
    "{% else %}{{ tool_call.arguments | tojson }}{% endif %}}\n</tool_call>"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Llama 3.1 style: tools in the system turn, calls as bare JSON with "parameters", results in the ipython role.
LLAMA3_TEMPLATE = _TEXT_MACRO + (
    "{{ bos_token }}"
    "{% set msgs = messages %}"
    "{% if tools or messages[0].role == 'system' %}"
    "<|start_header_id|>system<|end_header_id|>\n\n"
    "{% if tools %}Environment: ipython\n\n{% endif %}"
    "{% if messages[0].role == 'system' %}{{ text(messages[0].content) }}{% set msgs = messages[1:] %}"
    "{% else %}You are a helpful assistant.{% endif %}"
    "{% if tools %}\n\nTo call a function, reply with only a JSON object of the form "
    '{"name": function name, "parameters": object of argument names and values}. Functions:'
    "{% for tool in tools %}{{ '\\n\\n' }}{{ tool | tojson }}{% endfor %}"
    "{% endif %}"
    "<|eot_id|>"
    "{% endif %}"
    "{% for m in msgs %}"
    "<|start_header_id|>{{ 'ipython' if m.role == 'tool' else m.role }}<|end_header_id|>\n\n"
    "{{ text(m.content) }}"
    "{% for call in m.tool_calls or [] %}"
    "{% set tool_call = call.function if call.function is defined else call %}"
    "{% if not loop.first %}; {% endif %}"
    '{"name": "{{ tool_call.name }}", "parameters": '
    "{% if tool_call.arguments is string %}{{ tool_call.arguments }}"
    "{% else %}{{ tool_call.arguments | tojson }}{% endif %}}"
    "{% endfor %}"
    "<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@dataclass(frozen=True, slots=True)
class ChatFormat:
    """A chat template and the markup strings that a scripted model's tokenizer keeps whole."""

    template: str
    generation_prompt: str  # what add_generation_prompt appends: one special token, every prompt's last
    eos_token: str  # ends the assistant's turn; the model's EOS
    tool_result_marker: str  # written only where the template renders a tool result
    special_tokens: tuple[str, ...] = ()  # further markup to keep whole


CHATML = ChatFormat(CHATML_TEMPLATE, ASSISTANT_PROMPT_TOKEN, EOS_TOKEN, "<tool_response>")
LLAMA3 = ChatFormat(
    LLAMA3_TEMPLATE,
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "<|eot_id|>",
    "<|start_header_id|>ipython<|end_header_id|>\n\n",
    ("<|start_header_id|>", "<|end_header_id|>"),
)

_CORPUS = (
    "Hello! How are you today? I am fine, thank you. What can I do for you?",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "A small language model runs on the laptop and answers questions about the weather.",
    "The weather in Paris is sunny and warm; in London it is cold, grey and raining.",
    "Please write a short story about a robot who learns to cook pasta for friends.",
    "Numbers like 1, 2, 3, 42 and 2024 appear in dates, prices and the answers to sums.",
    "The router loads several models, keeps the hot ones in memory and swaps the rest.",
    "Tokens are generated one at a time; each new token depends on the ones before it.",
    'Function calls return JSON: {"name": "get_weather", "arguments": {"city": "Paris"}}.',
    'She said: "Thanks a lot!" and he answered, "You\'re welcome, it\'s no problem."',
    "Streaming responses send every piece of text to the client as soon as it is ready.",
    "Good morning, good evening and good night: people greet each other many ways.",
    "If the context window is full, the request fails with an error about its length.",
    "Water boils at 100 degrees; ice melts at zero. Science explains the world around us.",
    "Write code, test it, fix the bugs, then test it again until every check passes.",
)


@functools.lru_cache(maxsize=4)
def _base_tokenizer_json(vocab_size: int = 640) -> str:
    # Cached: training is deterministic, and tests build dozens of models per run.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 2, trainer)
    return tok.to_str()


def _new_tokenizer() -> Tokenizer:
    return Tokenizer.from_str(_base_tokenizer_json())


def _padded_tokenizer(vocab_size: int) -> Tokenizer:
    """The base tokenizer padded to ``vocab_size`` ids with BPE entries ``Ġw<id>`` (no merge yields them).

    Each decodes to a plain word (" w1234"), so a random model's text looks like prose to a server's parsers."""
    data = json.loads(_base_tokenizer_json())
    vocab: dict[str, int] = data["model"]["vocab"]
    size = max(vocab.values()) + 1
    if vocab_size < size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {size} tokens")
    vocab.update({f"Ġw{i}": i for i in range(size, vocab_size)})
    return Tokenizer.from_str(json.dumps(data))


def _token_id(tok: Tokenizer, token: str) -> int:
    token_id = tok.token_to_id(token)
    if token_id is None:
        raise KeyError(token)
    return token_id


def _new_model(config: dict[str, Any], vocab_size: int, seed: int) -> Model:
    mx.random.seed(seed)
    args = ModelArgs.from_dict({**config, "vocab_size": vocab_size})  # type: ignore[no-untyped-call]
    return Model(args)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_folder(
    path: Path,
    tok: Tokenizer,
    model: Model,
    config: dict[str, Any],
    chat_template: str,
    dtype: str,
    eos_token: str = EOS_TOKEN,
) -> Path:
    """Write config, weights and tokenizer files; ``config`` gains the token ids."""
    path.mkdir(parents=True, exist_ok=True)
    eos_id, bos_id = _token_id(tok, eos_token), _token_id(tok, BOS_TOKEN)
    config.update(
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        eos_token_id=eos_id,
        bos_token_id=bos_id,
        pad_token_id=_token_id(tok, PAD_TOKEN),
        torch_dtype=dtype,
    )
    _write_json(path / "config.json", config)
    _write_json(path / "generation_config.json", {"bos_token_id": bos_id, "eos_token_id": eos_id})
    params = cast(list[tuple[str, mx.array]], tree_flatten(model.parameters()))
    weights = {k: v.astype(getattr(mx, dtype)) for k, v in params}
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    tok.save(str(path / "tokenizer.json"))
    _write_json(
        path / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS_TOKEN,
            "eos_token": eos_token,
            "pad_token": PAD_TOKEN,
            "unk_token": None,
            "add_bos_token": False,
            "add_eos_token": False,
            # Cleanup would turn " ," into "," and break byte-exact replies.
            "clean_up_tokenization_spaces": False,
            "model_max_length": config["max_position_embeddings"],
            "chat_template": chat_template,
        },
    )
    return path


def _llama_config(
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    max_position_embeddings: int,
    tie_word_embeddings: bool,
) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tie_word_embeddings,
    }


def build_random_model(
    path: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    dtype: str = "float32",
    chat_template: str = CHATML_TEMPLATE,
    vocab_size: int | None = None,
    config_overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Write a randomly initialised Llama model folder loadable by ``mlx_lm.load``.

    Weights come from ``mlx_lm.models.llama.Model`` after ``mx.random.seed(seed)``,
    so the same arguments give the same files. ``dtype`` is an ``mx`` dtype name.
    ``vocab_size`` (default: the tokenizer's ~640) pads the tokenizer with word tokens
    that encoding never produces, so the model has a real-sized vocabulary.
    ``config_overrides`` are extra ``config.json`` fields applied before the model is
    built (``rope_theta``, ``rope_scaling``, ``tie_word_embeddings``: a real model's shape).
    Returns ``Path(path)``.
    """
    path = Path(path)
    tok = _new_tokenizer() if vocab_size is None else _padded_tokenizer(vocab_size)
    config = _llama_config(
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
    )
    config.update(config_overrides or {})
    model = _new_model(config, tok.get_vocab_size(with_added_tokens=True), seed)
    return _write_folder(path, tok, model, config, chat_template, dtype)


# A piece is a markup tag, a word or a punctuation run, each with the whitespace before it.
_PIECE_RE = re.compile(r"\s*<[^<>\s]+>|\s*\w+|\s*[^\w\s<]+|\s*<|\s+")


def _split_reply(reply: str, taken: Collection[str] = ()) -> list[str]:
    """Split ``reply`` into pieces that all differ, and differ from ``taken``, so a bigram table can replay them."""
    raw = _PIECE_RE.findall(reply)
    assert "".join(raw) == reply
    pieces: list[str] = []
    i = 0
    while i < len(raw):
        cur = raw[i]
        i += 1
        while cur in pieces or cur in taken:
            if i < len(raw):
                cur += raw[i]
                i += 1
            elif pieces:  # A repeat at the very end: absorb earlier pieces instead.
                cur = pieces.pop() + cur
            else:
                raise ValueError(f"{reply!r} cannot be split into pieces unlike the other reply's")
        pieces.append(cur)
    return pieces


def _byte_level(text: str) -> str:
    """``text`` in the byte-to-unicode alphabet that the ByteLevel decoder inverts."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return "".join(s for s, _ in pre.pre_tokenize_str(text))


def _swallows(piece: str, markup: str) -> bool:
    """Whether added token ``piece`` can match text that starts before ``markup`` and runs into it.

    Added tokens match leftmost first, so such a piece would split ``markup`` in a prompt.
    """
    return markup in piece or any(piece.endswith(markup[:k]) for k in range(1, min(len(piece), len(markup) + 1)))


def build_scripted_model(
    path: str | Path,
    reply: str,
    *,
    after_marker: tuple[str, str] | None = None,
    chat_format: ChatFormat = CHATML,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 1,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 64,
    max_position_embeddings: int = 2048,
    dtype: str = "float32",
) -> Path:
    """Write a model whose greedy continuation of any chat prompt is ``reply`` + EOS.

    The prompt must be rendered with ``chat_format``'s template (:data:`CHATML`, the
    default, or :data:`LLAMA3`) and ``add_generation_prompt=True``; its last token is then
    always the format's special generation-prompt token (:data:`ASSISTANT_PROMPT_TOKEN`
    for ChatML). ``reply`` is split into word/punctuation pieces (merged where needed so
    that no piece repeats), each becoming an added token, and the weights form a bigram
    table: prompt token -> first piece -> ... -> last piece -> EOS. Both
    ``tokenizer.decode`` and mlx-lm's streaming detokenizer give back ``reply`` exactly.

    ``after_marker=(marker, final_reply)`` adds ``marker`` as one token, and the model
    answers ``final_reply`` instead of ``reply`` whenever that token is anywhere in the
    prompt, at any length up to ``max_position_embeddings``. With the format's
    ``tool_result_marker`` as marker, ``reply`` can be a tool call and ``final_reply`` the
    answer after the tool result: a whole agent loop. How the weights do it:
    :mod:`helper_tools.scripted_weights`. Pieces of ``final_reply`` are kept apart from
    those of ``reply`` (merged further where needed); ``dtype`` may not be float16.

    Replies may not start with a space (mlx-lm's BPEStreamingDetokenizer drops the first
    one, as for real byte-level BPE models) nor contain the special tokens or the marker.
    Returns ``Path(path)``.
    """
    fmt = chat_format
    reserved = (*SPECIAL_TOKENS, fmt.generation_prompt, fmt.eos_token, *fmt.special_tokens)
    replies, marker = [reply], None
    if after_marker is not None:
        marker, final_reply = after_marker
        replies.append(final_reply)
        if not marker or marker in reserved:
            raise ValueError(f"the marker {marker!r} must be non-empty and not a special token")
        if dtype == "float16":
            raise ValueError("float16 cannot hold the activations of a model with after_marker")
    for text in replies:
        if text.startswith(" "):
            raise ValueError("a reply must not start with a space: mlx-lm's BPEStreamingDetokenizer strips it")
        if any(s in text for s in (*reserved, *([marker] if marker else []))):
            raise ValueError(f"a reply must not contain the special tokens {reserved} or the marker")
    path = Path(path)
    tok = _new_tokenizer()
    specials = (fmt.generation_prompt, fmt.eos_token, *fmt.special_tokens)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    first = _split_reply(reply)
    second = _split_reply(replies[1], taken=first) if marker is not None else []
    # Added tokens hold the byte-level form of each piece: the ByteLevel decoder maps
    # every character of a token back to a byte, so raw text such as "é" would decode
    # to a stray byte 0xE9 (in tokenizers and in mlx-lm's streaming detokenizer).
    pieces = [_byte_level(p) for p in (*first, *second)]
    tok.add_tokens([AddedToken(p, special=False, normalized=False) for p in pieces])
    markup = [fmt.generation_prompt]
    if marker is not None:
        tok.add_tokens([AddedToken(marker, special=False, normalized=False)])
        markup.append(marker)
    for piece in pieces:
        if any(_swallows(piece, m) for m in markup):
            raise ValueError(f"reply piece {piece!r} would split {markup} in prompts")
    # Pieces already in the BPE vocab keep their id; distinct pieces still get distinct ids.
    ids = [_token_id(tok, p) for p in pieces]
    start, eos = _token_id(tok, fmt.generation_prompt), _token_id(tok, fmt.eos_token)
    script = [start, *ids[: len(first)], eos]
    branch = None if marker is None else (_token_id(tok, marker), [*ids[len(first) :], eos])

    config = _llama_config(
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
    )
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    model = _new_model(config, vocab_size, seed)
    shape = LlamaShape(
        vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, max_position_embeddings
    )
    weights = scripted_weights(shape, script, branch, seed=seed)
    names = {name for name, _ in cast(list[tuple[str, mx.array]], tree_flatten(model.parameters()))}
    assert names >= weights.keys(), weights.keys() - names
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=False)
    return _write_folder(path, tok, model, config, fmt.template, dtype, fmt.eos_token)


def build_demo_model(
    model_dir: str | Path,
    name: str = "tiny-demo",
    reply: str = DEMO_REPLY,
    after_marker: tuple[str, str] | None = None,
) -> Path:
    """Write a scripted demo model to ``model_dir/name`` and return its path."""
    return build_scripted_model(Path(model_dir) / name, reply, after_marker=after_marker)


def main(argv: list[str] | None = None) -> int:
    """CLI: write a scripted demo model and say how to serve and query it."""
    parser = argparse.ArgumentParser(description="Write a tiny scripted MLX demo model.")
    parser.add_argument("--model-dir", required=True, type=Path, help="folder that holds model folders")
    parser.add_argument("--name", default="tiny-demo", help="model folder name (default: tiny-demo)")
    parser.add_argument("--reply", default=DEMO_REPLY, help="the reply the model gives")
    parser.add_argument(
        "--after-marker",
        nargs=2,
        metavar=("MARKER", "REPLY"),
        help=f"answer REPLY instead once MARKER is in the prompt; {CHATML.tool_result_marker!r} opens tool results",
    )
    args = parser.parse_args(argv)
    after_marker = tuple(args.after_marker) if args.after_marker else None
    path = build_demo_model(args.model_dir, args.name, args.reply, after_marker)
    print(f"Wrote scripted model to {path}:")
    for f in sorted(path.iterdir()):
        print(f"  {f.name:24s} {f.stat().st_size:>9,d} bytes")
    print(f"\nEvery chat request to it answers: {args.reply!r}")
    if after_marker:
        print(f"...or, once {after_marker[0]!r} is in the prompt: {after_marker[1]!r}")
    print(f"Check it: mlx_lm.generate --model {path} --prompt Hi")
    print(f"Serve it: mlx-router --model-dir {args.model_dir}")
    body = json.dumps({"model": args.name, "messages": [{"role": "user", "content": "Hi"}]})
    print(f"Query it: curl -s localhost:8800/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
