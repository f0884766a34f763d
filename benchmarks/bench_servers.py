"""The servers under test: how each is configured and started, on a free loopback port, and stopped.

* ``mlx_router``: this repository (`python main.py --config FILE --port P`).
* ``mlx_lm``: `python -m mlx_lm server`, batching flags set to our batch size.
* ``mlx_router_231``: mlx-router 2.3.1 from PyPI, in its own venv ``benchmarks/.venv-peer``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from bench_common import BENCH_DIR, ROOT

PEER_VENV = BENCH_DIR / ".venv-peer"
PEER_VERSION = "2.3.1"
# mlx-router 2.3.1 declares torch, torchvision and mlx-vlm, which its text path never imports: install it with
# --no-deps plus what it imports, and pin mlx/mlx-lm to this venv's versions so every server runs the same engine.
PEER_RUNTIME_DEPS = ("fastapi", "uvicorn", "pydantic", "psutil", "pyfiglet", "requests", "pillow", "jsonschema")
LABELS = {"mlx_router": "mlx-router (this repo)", "mlx_lm": "mlx_lm.server", "mlx_router_231": "mlx-router 2.3.1"}
MAX_BATCH = 128


@dataclass
class ServerSpec:
    key: str
    argv: list[str]
    cwd: Path
    model_a: str  # request `model` for the benchmark model
    model_b: str  # request `model` for its second copy (swap test)
    request_extra: dict[str, Any]
    reports_usage: bool
    flags: str
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return LABELS.get(self.key, self.key)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _version(python: str, dist: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    return out.stdout.strip() or "?"


def peer_python() -> Path:
    return PEER_VENV / "bin" / "python"


def ensure_peer(size: str, allow_install: bool, log: Path) -> tuple[bool, str]:
    """(available, why not / how installed). Installs into benchmarks/.venv-peer when it is missing and allowed."""
    exe = PEER_VENV / "bin" / "mlx-router"
    if exe.exists():
        return True, f"benchmarks/.venv-peer (mlx-router {_version(str(peer_python()), 'mlx-router')})"
    if not allow_install:
        return False, "not installed (benchmarks/.venv-peer missing; installing it was disabled)"
    mlx_v, lm_v = _version(sys.executable, "mlx"), _version(sys.executable, "mlx-lm")
    extra = "[cpu]" if size == "cpu" else "[cuda13]"
    mlx_req = f"mlx{extra}=={mlx_v}" if sys.platform == "linux" else f"mlx=={mlx_v}"
    steps = [
        [sys.executable, "-m", "venv", str(PEER_VENV)],
        [str(peer_python()), "-m", "pip", "install", "-q", "--no-deps", f"mlx-router=={PEER_VERSION}"],
        [str(peer_python()), "-m", "pip", "install", "-q", mlx_req, f"mlx-lm=={lm_v}", *PEER_RUNTIME_DEPS],
    ]
    print(f"installing mlx-router {PEER_VERSION} into {PEER_VENV} ...", flush=True)
    with log.open("a") as fh:
        for cmd in steps:
            fh.write("$ " + " ".join(cmd) + "\n")
            fh.flush()
            try:
                rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=1200, check=False).returncode
            except (OSError, subprocess.TimeoutExpired) as exc:
                rc, fh_msg = -1, str(exc)
                fh.write(fh_msg + "\n")
            if rc != 0:
                return False, f"not installed: `{' '.join(cmd[2:5])}` failed (offline?); see {log.name}"
    return exe.exists(), f"installed now into benchmarks/.venv-peer (pinned mlx {mlx_v}, mlx-lm {lm_v})"


def make_spec(key: str, model_dir: Path, work: Path, port: int, timeout_s: float, temperature: float) -> ServerSpec:
    """Config files and command line of one server; model_dir holds `bench` and `bench-b`."""
    a, b = model_dir / "bench", model_dir / "bench-b"
    sampling = {"temperature": temperature}
    if key == "mlx_router":
        cfg = {
            "defaults": {
                "model_directory": str(model_dir),
                "max_batch_size": MAX_BATCH,
                "timeout": timeout_s,
                "cache_size": 1,
                "max_queued_requests": 2 * MAX_BATCH,
            },
            "server": {"ip": "127.0.0.1", "port": port, "log_dir": str(work / "logs-mlx_router")},
            "models": {},
        }
        path = work / "mlx_router.json"
        path.write_text(json.dumps(cfg, indent=2))
        argv = [sys.executable, str(ROOT / "main.py"), "--config", str(path), "--port", str(port)]
        flags = f"max_batch_size {MAX_BATCH}, cache_size 1, timeout {timeout_s:g}"
        return ServerSpec(key, argv, ROOT, "bench", "bench-b", sampling, True, flags)
    if key == "mlx_lm":
        argv = [
            sys.executable,
            "-m",
            "mlx_lm",
            "server",
            "--model",
            str(a),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--decode-concurrency",
            str(MAX_BATCH),
            "--prompt-concurrency",
            "8",
            "--max-tokens",
            "4096",
        ]
        flags = f"--decode-concurrency {MAX_BATCH} --prompt-concurrency 8 (prefill step 2048, prompt cache 10)"
        return ServerSpec(key, argv, work, "default_model", str(b), sampling, True, flags)
    if key == "mlx_router_231":
        weight_gb = sum(p.stat().st_size for p in a.glob("*.safetensors")) / 1024**3
        model_cfg = {
            "max_tokens": 4096,
            "temp": temperature,
            "top_p": 1.0,
            "top_k": 0,
            "min_p": 0.0,
            "chat_template": "chatml",
            "required_memory_gb": max(1, math.ceil(weight_gb * 1.1)),
        }
        cfg = {
            "defaults": {
                "model_directory": str(model_dir),
                "timeout": int(timeout_s),
                "max_tokens": 4096,
                "stream_chunk_size": 1,
            },
            "server": {"ip": "127.0.0.1", "port": port},
            "models": {"bench": model_cfg, "bench-b": model_cfg},
        }
        path = work / "mlx_router_231.json"
        path.write_text(json.dumps(cfg, indent=2))
        argv = [str(PEER_VENV / "bin" / "mlx-router"), "--config", str(path), "--ip", "127.0.0.1", "--port", str(port)]
        notes = [
            f"requests omit sampling fields (2.3.1 rejects temperature 0); its config sets temp {temperature:g} "
            "(it clamps to >= 0.01), top_p 1, top_k/min_p off, and chat_template chatml (the same prompt text as "
            "the model's own template)",
            "2.3.1 sends no usage in streams: its completion tokens are counted by re-tokenizing the streamed text",
        ]
        return ServerSpec(
            key,
            argv,
            work,
            "bench",
            "bench-b",
            {},
            False,
            f"chat_template chatml, timeout {int(timeout_s)} (no batching option)",
            notes,
        )
    raise ValueError(f"unknown server {key!r}")


class ServerProcess:
    """One server child process in its own process group, logs to a file."""

    def __init__(self, spec: ServerSpec, port: int, log: Path) -> None:
        self.spec, self.port, self.log = spec, port, log
        self.base_url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("MLX_MODEL_DIR", None)
        self.spec.cwd.mkdir(parents=True, exist_ok=True)
        fh = self.log.open("ab")
        fh.write(("\n$ " + " ".join(self.spec.argv) + "\n").encode())
        fh.flush()
        self.proc = subprocess.Popen(
            self.spec.argv,
            cwd=self.spec.cwd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        fh.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout_s: float) -> str | None:
        """None when GET /v1/models answers 200; otherwise why not."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                return f"exited with status {self.proc.returncode if self.proc else '?'} (see {self.log.name})"
            try:
                if httpx.get(self.base_url + "/v1/models", timeout=5).status_code == 200:
                    return None
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        return f"not ready after {timeout_s:.0f}s"

    def stop(self, grace_s: float = 20.0) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group id is the child's pid
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError, PermissionError):  # children left behind in its group
            os.killpg(pgid, signal.SIGKILL)
        self.proc = None
