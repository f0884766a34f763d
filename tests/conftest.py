"""Shared fixtures: tiny models from helper_tools, and the real app on a real uvicorn socket."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from helper_tools.tiny_models import CHATML, LLAMA3, build_random_model, build_scripted_model  # noqa: E402
from mlx_router.app import create_app  # noqa: E402
from mlx_router.config.settings import Settings, load_settings  # noqa: E402
from mlx_router.core.manager import MLXModelManager  # noqa: E402
from mlx_router.logs import setup_logging  # noqa: E402

REPLIES = {
    "alpha": "Alpha speaking: the quick brown fox jumps over the lazy dog.",
    "bravo": "Bravo here, reporting for duty with a longer scripted answer.",
    "charlie": "Charlie says hello!",
}
# Agent-loop models: each calls get_weather, then answers once a tool result is in the prompt.
AGENT_CALLS = {
    "agent": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>',
    "agent-llama3": '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}',
}
AGENT_ANSWER = "It is 21 C and sunny in Paris."

setup_logging("INFO", None)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory with three scripted models, a small-context one, two agent-loop ones and a random one."""
    root = tmp_path_factory.mktemp("models")
    for name, reply in REPLIES.items():
        build_scripted_model(root / name, reply)
    for name, fmt in (("agent", CHATML), ("agent-llama3", LLAMA3)):
        after = (fmt.tool_result_marker, AGENT_ANSWER)
        build_scripted_model(root / name, AGENT_CALLS[name], after_marker=after, chat_format=fmt)
    build_scripted_model(root / "tiny-ctx", REPLIES["alpha"], max_position_embeddings=64)
    build_random_model(root / "random")
    return root


def never_eos(model_dir: Path, name: str = "random") -> dict[str, float]:
    """A logit_bias that keeps a random model from ending early, so timing-based tests stay deterministic."""
    eos = json.loads((model_dir / name / "config.json").read_text())["eos_token_id"]
    return {str(eos): -100.0}


def left_padded_logits(model: Any, monkeypatch: pytest.MonkeyPatch, sdpa: Any, *, split: int, steps: int) -> list[Any]:
    """Float32 logits of four left-padded prompts (3-36 tokens) in mlx-lm's `BatchKVCache`, with
    `mx.fast.scaled_dot_product_attention` set to `sdpa`: the prompt batch, read in two chunks at `split` (the
    second sees the first's keys), then `steps` decode steps fed the same tokens. The first chunk's logits leave
    out the rows it holds only padding of: their queries see no key, where MLX's backends differ (the CPU averages
    V, cuDNN does not); a NaN there would still reach the later logits through V."""
    import mlx.core as mx
    from mlx_lm.models.cache import BatchKVCache

    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", sdpa)
    prompts = [[5 + (i * 7 + j) % 300 for j in range(3 + 11 * i)] for i in range(4)]
    width = max(map(len, prompts))
    padded = mx.array([[0] * (width - len(p)) + p for p in prompts])
    cache = [BatchKVCache([width - len(p) for p in prompts]) for _ in model.layers]
    seen = mx.array([i for i, p in enumerate(prompts) if width - len(p) < split])
    out = [model(padded[:, :split], cache=cache)[:, -1][seen], model(padded[:, split:], cache=cache)[:, -1]]
    out += [model(mx.array([[7 + s]] * len(prompts)), cache=cache)[:, -1] for s in range(steps)]
    out = [x.astype(mx.float32) for x in out]
    mx.eval(out)
    return out


def make_settings(model_dir: Path, tmp_path: Path, **defaults: Any) -> Settings:
    models = defaults.pop("models", {})
    config = {"defaults": {"model_directory": str(model_dir), **defaults}, "server": {}, "models": models}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return load_settings(path, environ={})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RunningServer:
    def __init__(self, app: Any, port: int) -> None:
        self.app = app
        self.base_url = f"http://127.0.0.1:{port}"

    @property
    def manager(self) -> MLXModelManager:
        manager: MLXModelManager = self.app.state.manager
        return manager


@contextmanager
def run_server(settings: Settings, manager: MLXModelManager | None = None) -> Iterator[RunningServer]:
    """Serve the real app with uvicorn on a free loopback port, in a background thread."""
    app = create_app(settings, manager)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    try:
        yield RunningServer(app, port)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def serve(model_dir: Path, tmp_path: Path) -> Callable[..., Any]:
    """`with serve(cache_size=2) as srv:` runs the app with those `defaults` over the shared models."""

    def start(**defaults: Any) -> Any:
        return run_server(make_settings(model_dir, tmp_path, **defaults))

    return start
