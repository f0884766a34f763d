"""Health endpoints, docs, and the real entry point started as a process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from conftest import ROOT, make_settings, run_server


def test_health_with_models(serve: Any) -> None:
    with serve() as srv:
        httpx.post(
            srv.base_url + "/v1/chat/completions",
            json={"model": "alpha", "messages": [{"role": "user", "content": "hi"}]},
            timeout=30,
        )
        health = httpx.get(srv.base_url + "/health")
        details = httpx.get(srv.base_url + "/v1/health").json()
        docs = httpx.get(srv.base_url + "/docs")
        redoc = httpx.get(srv.base_url + "/redoc")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert details["requests"]["total"] >= 2 and details["uptime_s"] >= 0
    assert [m["id"] for m in details["loaded_models"]] == ["alpha"]
    assert details["memory"]["budget_gb"] > 0
    assert docs.status_code == 200 and redoc.status_code == 200


def test_empty_model_directory_still_serves(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with run_server(make_settings(empty, tmp_path)) as srv:
        models = httpx.get(srv.base_url + "/v1/models").json()
        health = httpx.get(srv.base_url + "/health")
    assert models == {"object": "list", "data": []}
    assert health.status_code == 503
    assert "no models" in health.json()["reason"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_main_py_starts_and_explains_how_to_add_a_model(tmp_path: Path) -> None:
    port = _port()
    env = {**os.environ, "MLX_ROUTER_PORT": str(port)}
    cmd = [sys.executable, str(ROOT / "main.py"), "--config", str(ROOT / "config.json"), "--model-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health")
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert health.status_code == 503
    assert "tiny_models.py" in err  # the log says how to add a model
    assert (tmp_path / "logs" / "mlx-router.log").exists()


def test_a_bad_config_exits_2_with_file_key_and_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"defaults": {"cache_size": "two"}}')
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--config", str(bad)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "bad.json" in result.stderr and "defaults.cache_size" in result.stderr
    assert "Traceback" not in result.stderr
