"""Model discovery: layouts, aliases, rescans, unsafe ids, bad folders, symlinks, context windows."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from mlx_router.config.discovery import (
    ModelRegistry,
    ModelSpec,
    context_window_of,
    estimate_memory_bytes,
    is_model_folder,
    is_safe_model_id,
)
from mlx_router.config.settings import ModelConfig, Settings, load_settings


def make_model(
    folder: Path, config: Any = None, weights: bytes = b"12345", extra: dict[str, str] | None = None
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config if config is not None else {"model_type": "llama"}))
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "tokenizer.json").write_text("{}")
    for name, text in (extra or {}).items():
        (folder / name).write_text(text)
    return folder


def settings_for(model_dir: Path, models: dict[str, Any] | None = None) -> Settings:
    return Settings.model_validate({"defaults": {"model_directory": str(model_dir)}, "models": models or {}})


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_hf(root: Path, org: str, name: str, snapshots: dict[str, bytes], main: str | None) -> Path:
    """A Hugging Face cache repo: files in snapshots are symlinks into blobs/."""
    repo = root / f"models--{org}--{name}"
    (repo / "blobs").mkdir(parents=True)
    for commit, weights in snapshots.items():
        snap = repo / "snapshots" / commit
        snap.mkdir(parents=True)
        files = {"config.json": json.dumps({"model_type": commit}).encode(), "tokenizer.json": b"{}"}
        files["model.safetensors"] = weights
        for file_name, data in files.items():
            blob = repo / "blobs" / f"{commit}-{file_name}"
            blob.write_bytes(data)
            (snap / file_name).symlink_to(os.path.relpath(blob, snap))
    if main is not None:
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(main)
    return repo


# --- layouts ------------------------------------------------------------------------------------------------------


def test_flat_layout(tmp_path: Path) -> None:
    make_model(tmp_path / "my-model", weights=b"x" * 100)
    make_model(tmp_path / "other", weights=b"")
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "README.md").write_text("hi")
    registry = ModelRegistry(settings_for(tmp_path))
    assert set(registry.scan()) == {"my-model", "other"}
    spec = registry.resolve("my-model")
    assert spec is not None
    assert (spec.id, spec.path, spec.weight_bytes, spec.model_type) == (
        "my-model",
        (tmp_path / "my-model").resolve(),
        100,
        "llama",
    )
    assert spec.aliases == () and spec.is_vision is False and spec.config == {"model_type": "llama"}
    assert [s.id for s in registry.list()] == ["my-model", "other"]


def test_known_answers_from_the_last_scan_without_disk_or_waiting(tmp_path: Path) -> None:
    make_model(tmp_path / "my-model")
    registry = ModelRegistry(settings_for(tmp_path))
    assert registry.known("my-model") is None  # nothing scanned yet
    spec = registry.resolve("my-model")
    assert spec is not None and registry.known("my-model") is spec
    make_model(tmp_path / "later")
    assert registry.known("later") is None  # a miss never scans: resolve (in a worker thread) does
    assert registry.known("../etc") is None
    with registry._lock:  # a rescan in progress: answer "unknown" at once instead of blocking the loop
        assert registry.known("my-model") is None
    assert registry.known("my-model") is spec


def test_model_folder_needs_config_weights_and_tokenizer(tmp_path: Path) -> None:
    folder = make_model(tmp_path / "m")
    assert is_model_folder(folder)
    for name in ("tokenizer_config.json", "tokenizer.model"):
        (folder / "tokenizer.json").unlink(missing_ok=True)
        (folder / name).write_text("{}")
        assert is_model_folder(folder)
        (folder / name).unlink()
    assert not is_model_folder(folder)  # no tokenizer file left
    make_model(folder)
    (folder / "model.safetensors").unlink()
    assert not is_model_folder(folder)
    make_model(folder)
    (folder / "config.json").unlink()
    assert not is_model_folder(folder)


def test_nested_layout_with_short_id(tmp_path: Path) -> None:
    make_model(tmp_path / "custom-models" / "my-model")
    make_model(tmp_path / "group-a" / "dup")
    make_model(tmp_path / "group-b" / "dup")
    make_model(tmp_path / "solo")
    make_model(tmp_path / "group-c" / "solo")
    registry = ModelRegistry(settings_for(tmp_path))
    assert set(registry.scan()) == {"custom-models/my-model", "group-a/dup", "group-b/dup", "solo", "group-c/solo"}
    spec = registry.resolve("my-model")
    assert spec is not None and spec.id == "custom-models/my-model" and spec.aliases == ("my-model",)
    assert registry.resolve("custom-models/my-model") is spec
    assert registry.resolve("dup") is None  # ambiguous: two groups hold one
    solo = registry.resolve("solo")
    assert solo is not None and solo.id == "solo"  # a direct model's id beats the nested one's short id


def test_hf_cache_layout_refs_main_and_symlinked_blobs(tmp_path: Path) -> None:
    make_hf(tmp_path, "mlx-community", "Tiny-4bit", {"aaa": b"x" * 10, "bbb": b"y" * 20}, main="aaa")
    registry = ModelRegistry(settings_for(tmp_path))
    spec = registry.resolve("mlx-community/Tiny-4bit")
    assert spec is not None
    assert spec.path == (tmp_path / "models--mlx-community--Tiny-4bit" / "snapshots" / "aaa").resolve()
    assert spec.weight_bytes == 10  # the blob's size, not the symlink's
    assert spec.model_type == "aaa"
    assert registry.resolve("Tiny-4bit") is spec  # short id


def test_hf_cache_without_refs_takes_newest_snapshot(tmp_path: Path) -> None:
    repo = make_hf(tmp_path, "org", "name", {"old": b"1", "new": b"22"}, main=None)
    os.utime(repo / "snapshots" / "old", (1_000, 1_000))
    os.utime(repo / "snapshots" / "new", (2_000, 2_000))
    spec = ModelRegistry(settings_for(tmp_path)).resolve("org/name")
    assert spec is not None and spec.model_type == "new" and spec.weight_bytes == 2


def test_hf_cache_refs_main_pointing_at_missing_snapshot_falls_back(tmp_path: Path) -> None:
    make_hf(tmp_path, "org", "name", {"only": b"1"}, main="gone")
    spec = ModelRegistry(settings_for(tmp_path)).resolve("org/name")
    assert spec is not None and spec.model_type == "only"


def test_explicit_path_anywhere_overrides_discovery(tmp_path: Path) -> None:
    models, elsewhere = tmp_path / "models", tmp_path / "elsewhere"
    make_model(models / "llama", {"model_type": "disk"})
    make_model(elsewhere / "x", {"model_type": "explicit"})
    registry = ModelRegistry(settings_for(models, {"llama": {"path": str(elsewhere / "x")}, "ghost": {"temp": 1}}))
    spec = registry.resolve("llama")
    assert spec is not None and spec.model_type == "explicit" and spec.path == (elsewhere / "x").resolve()
    assert registry.resolve("ghost") is None  # config for a model that may appear later


def test_aliases_from_config(tmp_path: Path) -> None:
    make_model(tmp_path / "org" / "Qwen3-8B")
    make_model(tmp_path / "taken")
    models = {"org/Qwen3-8B": {"alias": ["qwen", "taken"], "temp": 0.5}, "later": {"alias": "soon"}}
    registry = ModelRegistry(settings_for(tmp_path, models))
    spec = registry.resolve("qwen")
    assert spec is not None and spec.id == "org/Qwen3-8B" and spec.aliases == ("qwen", "Qwen3-8B")
    taken = registry.resolve("taken")
    assert taken is not None and taken.id == "taken"  # a model's own id beats another's alias
    assert registry.resolve("soon") is None
    assert registry.config_for(spec) == ModelConfig(alias=("qwen", "taken"), temp=0.5)
    assert registry.config_for(taken) is None


def test_missing_default_model_directory_finds_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    registry = ModelRegistry(load_settings(None, environ={}))
    assert registry.scan() == {} and registry.list() == [] and registry.resolve("x") is None
    assert not (tmp_path / "models").exists()


# --- rescans ------------------------------------------------------------------------------------------------------


def test_model_added_later_is_found_after_the_rescan_interval(tmp_path: Path) -> None:
    clock = FakeClock()
    registry = ModelRegistry(settings_for(tmp_path), rescan_interval=2.0, clock=clock)
    assert registry.list() == []
    make_model(tmp_path / "late")
    clock.now = 1.0
    assert registry.resolve("late") is None  # last scan too recent
    clock.now = 2.5
    spec = registry.resolve("late")
    assert spec is not None and spec.id == "late"
    assert [s.id for s in registry.list()] == ["late"]


def test_hit_does_not_rescan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_model(tmp_path / "m")
    clock = FakeClock()
    registry = ModelRegistry(settings_for(tmp_path), clock=clock)
    assert registry.resolve("m") is not None
    calls: list[int] = []
    monkeypatch.setattr(registry, "_scan", lambda: calls.append(1))
    clock.now = 100.0
    assert registry.resolve("m") is not None and calls == []
    assert registry.resolve("other") is None and calls == [1]


def test_list_rescans_only_when_stale(tmp_path: Path) -> None:
    make_model(tmp_path / "m")
    clock = FakeClock()
    registry = ModelRegistry(settings_for(tmp_path), clock=clock)
    assert [s.id for s in registry.list()] == ["m"]
    make_model(tmp_path / "n")
    assert [s.id for s in registry.list()] == ["m"]  # cached within the interval
    clock.now = 5.0
    assert [s.id for s in registry.list()] == ["m", "n"]


def test_concurrent_resolves(tmp_path: Path) -> None:
    for i in range(5):
        make_model(tmp_path / f"m{i}")
    registry = ModelRegistry(settings_for(tmp_path), rescan_interval=0.0)
    results: list[ModelSpec | None] = []

    def work() -> None:
        for i in range(20):
            results.append(registry.resolve(f"m{i % 6}"))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 160 and sum(r is None for r in results) == 8 * 3  # i % 6 == 5 never exists


# --- safety -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["../x", "/etc", "a/../../b", "..", "a\\b", "a\x00b", "./m"])
def test_unsafe_ids_rejected_without_touching_the_filesystem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: str
) -> None:
    registry = ModelRegistry(settings_for(tmp_path))
    monkeypatch.setattr(registry, "_scan", lambda: pytest.fail("scanned for an unsafe id"))
    assert not is_safe_model_id(bad)
    assert registry.resolve(bad) is None


def test_symlink_outside_the_model_directory(tmp_path: Path) -> None:
    models, outside = tmp_path / "models", tmp_path / "outside"
    make_model(outside / "ext")
    make_model(models / "real")
    models.joinpath("linked-out").symlink_to(outside / "ext", target_is_directory=True)
    models.joinpath("linked-in").symlink_to(models / "real", target_is_directory=True)
    registry = ModelRegistry(settings_for(models))
    assert set(registry.scan()) == {"real", "linked-in"}  # a symlink inside the directory is fine
    assert registry.resolve("linked-out") is None
    linked_in = registry.resolve("linked-in")
    assert linked_in is not None and linked_in.path == (models / "real").resolve()
    for spec in registry.list():
        assert spec.path.is_relative_to(models.resolve())
    # Named explicitly in the config, the outside folder is allowed.
    registry = ModelRegistry(settings_for(models, {"linked-out": {"path": str(models / "linked-out")}}))
    explicit = registry.resolve("linked-out")
    assert explicit is not None and explicit.path == (outside / "ext").resolve()


def test_bad_config_json_is_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from loguru import logger

    handler = logger.add(caplog.handler, level="WARNING", format="{message}")
    try:
        make_model(tmp_path / "good")
        make_model(tmp_path / "broken").joinpath("config.json").write_text("{not json")
        make_model(tmp_path / "listy", [1, 2])
        registry = ModelRegistry(settings_for(tmp_path))
        assert set(registry.scan()) == {"good"}
        registry.scan()
    finally:
        logger.remove(handler)
    warnings = [r.getMessage() for r in caplog.records]
    assert sum("broken" in w for w in warnings) == 1  # warned once, not on every rescan
    assert any("listy" in w and "not a JSON object" in w for w in warnings)


# --- metadata -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"max_position_embeddings": 32768, "max_seq_len": 4}, 32768),
        ({"max_seq_len": 2048}, 2048),
        ({"n_positions": 1024}, 1024),
        ({"seq_length": 8192}, 8192),
        ({"max_sequence_length": 4096}, 4096),
        ({"text_config": {"max_position_embeddings": 131072}, "vision_config": {}}, 131072),
        ({"max_position_embeddings": True}, None),
        ({"max_position_embeddings": "big"}, None),
        ({}, None),
    ],
)
def test_context_window(config: dict[str, Any], expected: int | None) -> None:
    assert context_window_of(config) == expected


def test_spec_metadata_and_vision(tmp_path: Path) -> None:
    make_model(tmp_path / "vlm", {"model_type": "qwen2_vl", "vision_config": {}, "text_config": {"seq_length": 999}})
    make_model(tmp_path / "proc", {"model_type": "x"}, extra={"preprocessor_config.json": "{}"})
    (tmp_path / "vlm" / "model-00002.safetensors").write_bytes(b"123")
    registry = ModelRegistry(settings_for(tmp_path))
    vlm, proc = registry.resolve("vlm"), registry.resolve("proc")
    assert vlm is not None and proc is not None
    assert (vlm.is_vision, vlm.context_window, vlm.model_type, vlm.weight_bytes) == (True, 999, "qwen2_vl", 8)
    assert proc.is_vision is True and proc.context_window is None


def test_estimate_memory_bytes(tmp_path: Path) -> None:
    spec = ModelSpec("m", tmp_path, {}, None, 1000, None, False)
    assert estimate_memory_bytes(spec, None, 1.2) == 1200
    assert estimate_memory_bytes(spec, ModelConfig(), 1.5) == 1500
    assert estimate_memory_bytes(spec, ModelConfig(required_memory_gb=2), 1.2) == 2 * 1024**3
