"""Chat completions over a real socket with the official openai SDK and raw httpx."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from conftest import REPLIES

USER = [{"role": "user", "content": "Say something."}]


def client(srv: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0)


def test_models_list_shows_every_model_with_context_window(serve: Any) -> None:
    with serve() as srv:
        models = {m.id: m for m in client(srv).models.list().data}
    assert {"alpha", "bravo", "charlie", "tiny-ctx", "random"} <= set(models)
    alpha = models["alpha"].model_dump()
    assert alpha["object"] == "model"
    assert alpha["context_window"] == 2048
    assert models["tiny-ctx"].model_dump()["context_window"] == 64
    assert alpha["loaded"] is False and alpha["estimated_memory_gb"] >= 0


def test_non_stream_returns_the_scripted_text_and_usage(serve: Any) -> None:
    with serve() as srv:
        r = client(srv).chat.completions.create(model="alpha", messages=USER)
        listed = {m.id: m.model_dump() for m in client(srv).models.list().data}
    assert r.choices[0].message.content == REPLIES["alpha"]
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop"
    assert r.model == "alpha" and r.id.startswith("chatcmpl-")
    assert r.usage is not None and r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert listed["alpha"]["loaded"] is True


def test_stream_chunk_sequence_and_usage(serve: Any) -> None:
    with serve() as srv:
        chunks = list(
            client(srv).chat.completions.create(
                model="bravo", messages=USER, stream=True, stream_options={"include_usage": True}
            )
        )
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == REPLIES["bravo"]
    assert len(deltas) > 5, "tokens must arrive one by one, not as one blob"
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 5
    assert len({c.id for c in chunks}) == 1


def test_raw_sse_ends_with_done_and_has_no_usage_unless_asked(serve: Any) -> None:
    with serve() as srv:
        body = {"model": "charlie", "messages": USER, "stream": True}
        with httpx.stream("POST", srv.base_url + "/v1/chat/completions", json=body, timeout=30) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["x-request-id"]
            lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    payloads = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)
    assert all("usage" not in p for p in payloads)
    assert "".join(p["choices"][0]["delta"].get("content") or "" for p in payloads) == REPLIES["charlie"]


def test_length_finish_reason(serve: Any) -> None:
    with serve() as srv:
        r = client(srv).chat.completions.create(model="alpha", messages=USER, max_tokens=3)
        s = list(
            client(srv).chat.completions.create(model="alpha", messages=USER, max_completion_tokens=3, stream=True)
        )
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 3
    assert REPLIES["alpha"].startswith(r.choices[0].message.content or "x")
    assert [c.choices[0].finish_reason for c in s if c.choices[0].finish_reason] == ["length"]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_are_never_emitted_even_across_tokens(serve: Any, stream: bool) -> None:
    # "ck bro" spans the tokens " quick" and " brown".
    with serve() as srv:
        kwargs: dict[str, Any] = {"model": "alpha", "messages": USER, "stop": ["ck bro", "never"]}
        if stream:
            chunks = list(client(srv).chat.completions.create(stream=True, **kwargs))
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            r = client(srv).chat.completions.create(**kwargs)
            text, finish = r.choices[0].message.content or "", r.choices[0].finish_reason
        single = client(srv).chat.completions.create(model="alpha", messages=USER, stop="speaking")
    assert text == "Alpha speaking: the qui"
    assert finish == "stop"
    assert single.choices[0].message.content == "Alpha "


def test_seed_makes_sampling_reproducible(serve: Any) -> None:
    with serve() as srv:
        c = client(srv)

        def sample(seed: int) -> str:
            r = c.chat.completions.create(model="random", messages=USER, temperature=1.0, seed=seed, max_tokens=24)
            return r.choices[0].message.content or ""

        first, again, other = sample(7), sample(7), sample(8)
    assert first == again
    assert first != other


def test_logprobs_and_top_logprobs(serve: Any) -> None:
    with serve() as srv:
        r = client(srv).chat.completions.create(model="alpha", messages=USER, logprobs=True, top_logprobs=3)
        s = list(client(srv).chat.completions.create(model="alpha", messages=USER, logprobs=True, stream=True))
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert "".join(t.token for t in content) == REPLIES["alpha"]
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token  # greedy: the sampled token is the most likely
        assert bytes(t.bytes or []) == t.token.encode()
    streamed = [
        lp.token for c in s if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content or []
    ]
    assert "".join(streamed) == REPLIES["alpha"]


def test_unknown_extra_fields_are_ignored(serve: Any) -> None:
    with serve() as srv:
        body = {"model": "alpha", "messages": USER, "some_vendor_flag": True, "metadata": {"a": 1}}
        r = httpx.post(srv.base_url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == REPLIES["alpha"]


def test_default_stream_from_config_and_json_lines_format(serve: Any) -> None:
    with serve(stream=True, streaming_format="json_lines") as srv:
        r = httpx.post(srv.base_url + "/v1/chat/completions", json={"model": "alpha", "messages": USER}, timeout=30)
    assert r.headers["content-type"].startswith("application/x-ndjson")
    chunks = [json.loads(line) for line in r.text.splitlines() if line]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == REPLIES["alpha"]


def test_system_and_text_parts_are_accepted(serve: Any) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Again."},
    ]
    with serve() as srv:
        r = client(srv).chat.completions.create(model="charlie", messages=messages)
    assert r.choices[0].message.content == REPLIES["charlie"]
