"""Tiny, fully local MLX model folders for tests, demos and benchmarks.

Every builder writes a folder that ``mlx_lm.load`` accepts: a Llama
``config.json``, ``model.safetensors``, a byte-level BPE ``tokenizer.json``
trained here on a built-in corpus, and a ``tokenizer_config.json`` with a
ChatML chat template (Qwen-style tool calls, so mlx-lm infers the
``json_tools`` parser).

* :func:`build_random_model` - random weights; output is gibberish.
* :func:`build_scripted_model` - greedy decoding after any chat prompt emits a
  fixed reply, then ``<|im_end|>``.
* :func:`build_demo_model` - a scripted model with a friendly reply, also
  available as ``python helper_tools/tiny_models.py --model-dir DIR``.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.llama import Model, ModelArgs
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = [
    "ASSISTANT_PROMPT_TOKEN",
    "BOS_TOKEN",
    "CHATML_TEMPLATE",
    "DEMO_REPLY",
    "EOS_TOKEN",
    "PAD_TOKEN",
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

CHATML_TEMPLATE = (
    "{% macro text(content) %}"
    "{% if content is string %}{{ content }}"
    "{% elif content %}{% for part in content if part.type == 'text' %}{{ part.text }}{% endfor %}"
    "{% endif %}"
    "{% endmacro %}"
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
) -> Path:
    """Write config, weights and tokenizer files; ``config`` gains the token ids."""
    path.mkdir(parents=True, exist_ok=True)
    eos_id, bos_id = _token_id(tok, EOS_TOKEN), _token_id(tok, BOS_TOKEN)
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
            "eos_token": EOS_TOKEN,
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


def _split_reply(reply: str) -> list[str]:
    """Split ``reply`` into pieces that all differ, so a bigram table can replay them."""
    raw = _PIECE_RE.findall(reply)
    assert "".join(raw) == reply
    pieces: list[str] = []
    i = 0
    while i < len(raw):
        cur = raw[i]
        i += 1
        while cur in pieces:
            if i < len(raw):
                cur += raw[i]
                i += 1
            else:  # A repeat at the very end: absorb earlier pieces instead.
                cur = pieces.pop() + cur
        pieces.append(cur)
    return pieces


def _byte_level(text: str) -> str:
    """``text`` in the byte-to-unicode alphabet that the ByteLevel decoder inverts."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return "".join(s for s, _ in pre.pre_tokenize_str(text))


def build_scripted_model(
    path: str | Path,
    reply: str,
    *,
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

    The prompt must be rendered with the chat template and
    ``add_generation_prompt=True``; its last token is then always the special
    :data:`ASSISTANT_PROMPT_TOKEN`. ``reply`` is split into word/punctuation
    pieces (merged where needed so that no piece repeats), each becoming an added
    token, and the weights form a bigram table: prompt token -> first piece ->
    ... -> last piece -> ``<|im_end|>``. Both ``tokenizer.decode`` and mlx-lm's
    streaming detokenizer give back ``reply`` exactly.

    ``reply`` may not start with a space (mlx-lm's BPE streaming detokenizer
    drops the first one, as for real byte-level BPE models) nor contain the
    special token strings. Returns ``Path(path)``.
    """
    if reply.startswith(" "):
        raise ValueError("reply must not start with a space: mlx-lm's BPEStreamingDetokenizer strips it")
    if any(s in reply for s in (*SPECIAL_TOKENS, ASSISTANT_PROMPT_TOKEN)):
        raise ValueError(f"reply must not contain the special tokens {SPECIAL_TOKENS}")
    path = Path(path)
    tok = _new_tokenizer()
    tok.add_special_tokens([AddedToken(ASSISTANT_PROMPT_TOKEN, special=True, normalized=False)])
    # Added tokens hold the byte-level form of each piece: the ByteLevel decoder maps
    # every character of a token back to a byte, so raw text such as "é" would decode
    # to a stray byte 0xE9 (in tokenizers and in mlx-lm's streaming detokenizer).
    pieces = [_byte_level(p) for p in _split_reply(reply)]
    tok.add_tokens([AddedToken(p, special=False, normalized=False) for p in pieces])
    # Pieces already in the BPE vocab keep their id; distinct pieces still get distinct ids.
    chain = [_token_id(tok, t) for t in (ASSISTANT_PROMPT_TOKEN, *pieces, EOS_TOKEN)]
    assert len(set(chain)) == len(chain), chain

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
    for layer in model.model.layers:
        # No residual updates: the final hidden state is the current token's embedding.
        layer.self_attn.o_proj.weight = mx.zeros_like(layer.self_attn.o_proj.weight)
        layer.mlp.down_proj.weight = mx.zeros_like(layer.mlp.down_proj.weight)

    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((vocab_size, hidden_size)).astype(np.float32)
    sources = chain[:-1]
    if len(sources) <= hidden_size:
        # Orthonormal source embeddings: the wrong logits are exactly zero.
        q, _ = np.linalg.qr(rng.standard_normal((hidden_size, len(sources))))
        emb[sources] = q.T
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    # After RMSNorm a token's state is sqrt(d) * its unit embedding, so row next(t) = unit(t)
    # gives the right successor a logit of `peak` and (Cauchy-Schwarz) every other one less.
    peak = 30.0
    head = np.zeros((vocab_size, hidden_size), dtype=np.float32)
    head[chain[1:]] = unit[sources] * (peak / np.sqrt(hidden_size))
    model.model.embed_tokens.weight = mx.array(emb)
    model.model.norm.weight = mx.ones((hidden_size,))
    model.lm_head.weight = mx.array(head)
    return _write_folder(path, tok, model, config, CHATML_TEMPLATE, dtype)


def build_demo_model(model_dir: str | Path, name: str = "tiny-demo", reply: str = DEMO_REPLY) -> Path:
    """Write a scripted demo model to ``model_dir/name`` and return its path."""
    return build_scripted_model(Path(model_dir) / name, reply)


def main(argv: list[str] | None = None) -> int:
    """CLI: write a scripted demo model and say how to serve and query it."""
    parser = argparse.ArgumentParser(description="Write a tiny scripted MLX demo model.")
    parser.add_argument("--model-dir", required=True, type=Path, help="folder that holds model folders")
    parser.add_argument("--name", default="tiny-demo", help="model folder name (default: tiny-demo)")
    parser.add_argument("--reply", default=DEMO_REPLY, help="the reply the model always gives")
    args = parser.parse_args(argv)
    path = build_demo_model(args.model_dir, args.name, args.reply)
    print(f"Wrote scripted model to {path}:")
    for f in sorted(path.iterdir()):
        print(f"  {f.name:24s} {f.stat().st_size:>9,d} bytes")
    print(f"\nEvery chat request to it answers: {args.reply!r}")
    print(f"Check it: mlx_lm.generate --model {path} --prompt Hi")
    print(f"Serve it: mlx-router --model-dir {args.model_dir}")
    body = json.dumps({"model": args.name, "messages": [{"role": "user", "content": "Hi"}]})
    print(f"Query it: curl -s localhost:8800/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
