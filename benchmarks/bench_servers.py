"""The servers under test: how each is configured, started on a free loopback port, and stopped.

* ``mlx_router``: this repository (`python main.py --config FILE --port P`, cwd = the repository).
* ``mlx_lm``: `python -m mlx_lm server`, its batching flags set to our batch size.
* ``mlx_router_231``: mlx-router 2.3.1 from PyPI. Its package name is ours too, so it lives in its own folder
  (`pip install --target DIR`, see PEER_INSTALL) and runs with PYTHONPATH=DIR, the repository taken off the path.
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
from dataclasses import dataclass
from pathlib import Path

import httpx
from bench_common import OFFLINE_ENV, ROOT, die_with_parent

LABELS = {"mlx_router": "mlx-router (this repo)", "mlx_lm": "mlx_lm.server", "mlx_router_231": "mlx-router 2.3.1"}
PEER_VERSION = "2.3.1"
# What 2.3.1 imports beyond this repository's own dependencies (its declared torch, torchvision, huggingface-hub and
# fastapi[all] are not needed for text): the same mlx and mlx-lm as ours, so every server runs one engine.
PEER_WHEELS = (
    f"mlx-router=={PEER_VERSION}",
    "pyfiglet==1.0.4",
    "jsonschema==4.26.0",
    "jsonschema-specifications==2025.9.1",
    "referencing==0.37.0",
    "rpds-py==2026.9.1",
    "attrs==26.1.0",
)
PEER_INSTALL = "python -m pip install --no-deps --target {site} " + " ".join(PEER_WHEELS)
MAX_BATCH = 128
MAIN = "bench"  # the served folder of the load levels; the others are the single-stream and swap models


@dataclass
class ServerSpec:
    key: str
    argv: list[str]
    cwd: Path
    env: dict[str, str]
    names: dict[str, str]  # served folder name -> the `model` field this server expects
    flags: str
    serial: bool = False  # no batching: each request generates on its own (alone, or beside a few in threads)
    alarms: tuple[str, ...] = ()  # log lines that make its figures suspect

    @property
    def label(self) -> str:
        return LABELS[self.key]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _peer_env(site: Path) -> dict[str, str]:
    """PYTHONPATH = the peer's folder, then the inherited entries but the repository (whose `mlx_router` is ours)."""
    keep = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT]
    return {**os.environ, **OFFLINE_ENV, "PYTHONPATH": os.pathsep.join([str(site), *keep])}


def check_peer(site: Path) -> str | None:
    """None when `site` holds mlx-router 2.3.1 importable beside this Python's mlx; else why not."""
    if not site.is_dir():
        return f"{site} does not exist; install: {PEER_INSTALL.format(site=site)}"
    code = "import mlx_router.__version__ as v, mlx_router.cli; print(v.VERSION)"
    try:
        out = subprocess.run(
            [sys.executable, "-c", code],
            cwd=site,
            env=_peer_env(site),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"could not run Python: {exc}"
    version = out.stdout.strip()
    if version == PEER_VERSION:
        return None
    detail = version or (out.stderr.strip().splitlines() or ["no output"])[-1]
    return f"no mlx-router {PEER_VERSION} in {site} ({detail[:120]}); install: {PEER_INSTALL.format(site=site)}"


def make_spec(
    key: str, model_dir: Path, work: Path, port: int, timeout_s: float, temperature: float, peer_site: Path
) -> ServerSpec:
    """Config and command line of one server; `model_dir` holds the served folders (per-file symlinks)."""
    folders = sorted(p.name for p in model_dir.iterdir() if p.is_dir())
    env = {**os.environ, **OFFLINE_ENV}
    env.pop("MLX_MODEL_DIR", None)
    if key == "mlx_router":
        defaults = {
            "model_directory": str(model_dir),
            "max_batch_size": MAX_BATCH,
            "timeout": timeout_s,
            "cache_size": 1,
            "max_queued_requests": 2 * MAX_BATCH,
        }
        cfg = {"defaults": defaults, "server": {"ip": "127.0.0.1", "port": port, "log_dir": str(work / "logs-ours")}}
        path = work / "mlx_router.json"
        path.write_text(json.dumps(cfg, indent=2))
        argv = [sys.executable, str(ROOT / "main.py"), "--config", str(path), "--port", str(port)]
        flags = f"max_batch_size {MAX_BATCH}, cache_size 1 (one model resident), defaults otherwise"
        return ServerSpec(key, argv, ROOT, env, {f: f for f in folders}, flags)
    if key == "mlx_lm":
        # It loads whatever path a request names (one model at a time): every model is asked for by its path.
        argv = [
            sys.executable,
            "-m",
            "mlx_lm",
            "server",
            "--model",
            str(model_dir / MAIN),
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
        flags = f"--decode-concurrency {MAX_BATCH} --prompt-concurrency 8 (defaults: prefill step 2048, prompt cache)"
        return ServerSpec(key, argv, work, env, {f: str(model_dir / f) for f in folders}, flags)
    if key == "mlx_router_231":
        weight_gb = max(sum(f.stat().st_size for f in (model_dir / m).glob("*.safetensors")) for m in folders) / 1e9
        # Same sampling as the requests (temp 1, top_p 1, no top-k/min-p); its chatml template renders the same
        # prompt text as the models' own template.
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
            "models": {f: model_cfg for f in folders},
        }
        path = work / "mlx_router_231.json"
        path.write_text(json.dumps(cfg, indent=2))
        entry = "from mlx_router.cli import main; main()"
        argv = [sys.executable, "-c", entry, "--config", str(path), "--ip", "127.0.0.1", "--port", str(port)]
        flags = (
            "chatml template, its defaults otherwise (no batching: each request's whole `mlx_lm.generate` runs in a "
            f"pool of cores/2 threads, so up to {max(1, (os.cpu_count() or 2) // 2)} at once here, on one model)"
        )
        # Under memory pressure it lowers max_tokens without saying so in the answer; its tokens are not counted.
        alarms = ("Reducing max_tokens",)
        return ServerSpec(key, argv, work, _peer_env(peer_site), {f: f for f in folders}, flags, True, alarms)
    raise ValueError(f"unknown server {key!r}")


class ServerProcess:
    """One server child process in its own process group, its output appended to a log file."""

    def __init__(self, spec: ServerSpec, port: int, log: Path) -> None:
        self.spec, self.log = spec, log
        self.base_url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as fh:
            fh.write(("\n$ " + " ".join(self.spec.argv) + "\n").encode())
            fh.flush()
            self.proc = subprocess.Popen(
                self.spec.argv,
                preexec_fn=die_with_parent,
                cwd=self.spec.cwd,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.spec.env,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout_s: float) -> str | None:
        """None once GET /health answers at all (the warm-up request then waits for the model to load)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                return f"exited with status {self.proc.returncode if self.proc else '?'} (see {self.log.name})"
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(self.base_url + "/health", timeout=5)
                return None
            time.sleep(0.5)
        return f"not ready after {timeout_s:.0f}s"

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM to its process group, SIGKILL after `grace_s`; nothing of it is left running."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group id is the child's pid
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=wait)
        with contextlib.suppress(ProcessLookupError, PermissionError):  # anything it left in its group
            os.killpg(pgid, signal.SIGKILL)
        self.proc = None

    def restart(self, timeout_s: float) -> str | None:
        self.stop()
        self.start()
        return self.wait_ready(timeout_s)
