"""Every error leaves in OpenAI's envelope with the right status; none is a 500 or a hang."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import REPLIES, make_settings, never_eos, run_server

USER = [{"role": "user", "content": "Say something."}]


def post(srv: Any, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(srv.base_url + "/v1/chat/completions", timeout=30, **kwargs, **({"json": body} if body else {}))


def assert_envelope(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    return dict(error)


def test_unknown_model_is_404_model_not_found(serve: Any) -> None:
    with serve() as srv:
        with pytest.raises(openai.NotFoundError) as info:
            openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x").chat.completions.create(
                model="no-such-model", messages=USER
            )
        assert info.value.code == "model_not_found"
        error = assert_envelope(post(srv, {"model": "../etc", "messages": USER}), 404, "model_not_found")
    assert error["param"] == "model"


def test_malformed_json_and_invalid_fields_are_400(serve: Any) -> None:
    with serve() as srv:
        bad_json = post(
            srv, None, content=b'{"model": "alpha", "messages": [', headers={"content-type": "application/json"}
        )
        assert "JSON" in assert_envelope(bad_json, 400)["message"]
        assert assert_envelope(post(srv, {"model": "alpha"}), 400)["param"] == "messages"
        assert assert_envelope(post(srv, {"model": "alpha", "messages": USER, "temperature": 7}), 400)["param"] == (
            "temperature"
        )
        assert_envelope(post(srv, {"model": "alpha", "messages": [{"role": "wizard", "content": "x"}]}), 400)
        assert_envelope(post(srv, {"model": "alpha", "messages": USER, "n": 2}), 400, "unsupported_parameter")
        assert_envelope(post(srv, {"model": "alpha", "messages": USER, "max_tokens": 0}), 400)
        assert_envelope(post(srv, {"model": "alpha", "messages": USER, "stop": [""]}), 400)


def test_prompt_longer_than_context_is_400(serve: Any) -> None:
    long = [{"role": "user", "content": "word " * 200}]
    with serve() as srv:
        assert_envelope(post(srv, {"model": "tiny-ctx", "messages": long}), 400, "context_length_exceeded")
        streamed = post(srv, {"model": "tiny-ctx", "messages": long, "stream": True})
        assert_envelope(streamed, 400, "context_length_exceeded")
        too_many = {"model": "tiny-ctx", "messages": USER, "max_tokens": 500}
        assert assert_envelope(post(srv, too_many), 400, "context_length_exceeded")["param"] == "max_tokens"
        ok = post(srv, {"model": "tiny-ctx", "messages": USER})  # the default limit is clamped to what fits
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == REPLIES["alpha"]


def test_a_model_that_cannot_load_is_503_and_others_keep_serving(model_dir: Path, tmp_path: Path) -> None:
    broken = model_dir / "broken"
    broken.mkdir(exist_ok=True)
    for name in ("config.json", "tokenizer_config.json", "tokenizer.json"):
        (broken / name).write_text((model_dir / "alpha" / name).read_text())
    (broken / "model.safetensors").write_bytes(b"this is not a safetensors file")
    try:
        with run_server(make_settings(model_dir, tmp_path)) as srv:
            first = post(srv, {"model": "alpha", "messages": USER})
            error = assert_envelope(post(srv, {"model": "broken", "messages": USER}), 503, "model_load_failed")
            assert "broken" in error["message"]
            after = post(srv, {"model": "alpha", "messages": USER})
            again = post(srv, {"model": "broken", "messages": USER, "stream": True})
            assert_envelope(again, 503, "model_load_failed")
    finally:
        for f in broken.iterdir():
            f.unlink()
        broken.rmdir()
    assert first.status_code == after.status_code == 200
    assert after.json()["choices"][0]["message"]["content"] == REPLIES["alpha"]


def test_error_after_stream_started_is_an_sse_error_event(serve: Any, model_dir: Path) -> None:
    with serve(timeout=0.3) as srv:
        body = {"model": "random", "messages": USER, "stream": True, "seed": 1, "logit_bias": never_eos(model_dir)}
        with httpx.stream("POST", srv.base_url + "/v1/chat/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert "[DONE]" not in events
    last = json.loads(events[-1])
    assert last["error"]["code"] == "timeout"
    assert any(json.loads(e).get("choices") for e in events[:-1])


def test_unknown_route_and_method_use_the_envelope(serve: Any) -> None:
    with serve() as srv:
        assert_envelope(httpx.get(srv.base_url + "/v1/nothing-here"), 404)
        assert_envelope(httpx.get(srv.base_url + "/v1/chat/completions"), 405)
