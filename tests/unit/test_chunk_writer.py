"""The streamed chunks' JSON text: the prebuilt content-chunk template must equal serialising the whole chunk."""

from __future__ import annotations

import json

import pytest

from mlx_router.api.openai.convert import ChunkWriter
from mlx_router.core.types import TextDelta, TokenLogprob


@pytest.mark.parametrize("text", ["plain", ' "quoted" \\ back', "line\nbreak\ttab", "é ✓ 😀", "\x00 nul \x1f", ""])
def test_a_content_chunk_is_the_whole_chunk_serialised(text: str) -> None:
    writer = ChunkWriter("chatcmpl-x", 'model "q"', created=1700000000)
    expected = {
        "id": "chatcmpl-x",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": 'model "q"',
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}],
    }
    chunk = writer.text(TextDelta(text))
    assert json.loads(chunk) == expected
    assert chunk == json.dumps(expected, ensure_ascii=False)  # byte for byte what the slow path would send


def test_a_chunk_with_logprobs_carries_them() -> None:
    writer = ChunkWriter("chatcmpl-x", "m", logprobs=True)
    chunk = json.loads(writer.text(TextDelta("hi", (TokenLogprob("hi", -0.5, (104, 105)),))))
    assert chunk["choices"][0]["delta"] == {"content": "hi"}
    assert chunk["choices"][0]["logprobs"]["content"] == [
        {"token": "hi", "logprob": -0.5, "bytes": [104, 105], "top_logprobs": []}
    ]
