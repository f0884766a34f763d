"""Model discovery: which model folders exist, under which ids and aliases. No MLX, no network.

Layouts under the model directory, in order of precedence when two claim one id:

- ``models.<id>.path`` in the config: an explicit folder, which may lie anywhere;
- ``<dir>/<name>/`` → ``<name>``, and ``<dir>/<group>/<name>/`` → ``<group>/<name>``;
- the Hugging Face cache, ``<dir>/models--<org>--<name>/snapshots/<hash>/`` → ``<org>/<name>``.

An id with a ``/`` also answers to its last part (``<name>``) while no other model or alias claims that name.
A discovered folder that resolves outside the model directory (a symlink to elsewhere) is skipped: name it in
``models.<id>.path`` to use it.
"""

from __future__ import annotations

import builtins
import json
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from loguru import logger

from mlx_router.config.settings import ModelConfig, Settings, is_safe_model_id

__all__ = [
    "ModelRegistry",
    "ModelSpec",
    "context_window_of",
    "estimate_memory_bytes",
    "is_model_folder",
    "is_safe_model_id",
    "read_model_spec",
]

CONTEXT_KEYS = ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length", "max_sequence_length")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
HF_PREFIX = "models--"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model folder found on disk."""

    id: str
    path: Path  # the folder, symlinks resolved
    config: dict[str, Any]  # its config.json
    context_window: int | None
    weight_bytes: int  # total size of the *.safetensors files (symlink targets)
    model_type: str | None
    is_vision: bool
    aliases: tuple[str, ...] = ()  # configured aliases, then the short id when it is registered


def _weights(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.safetensors") if p.is_file())


def is_model_folder(folder: Path) -> bool:
    """A folder with config.json, at least one *.safetensors file and a tokenizer file."""
    try:
        return (
            folder.is_dir()
            and (folder / "config.json").is_file()
            and any((folder / name).is_file() for name in TOKENIZER_FILES)
            and bool(_weights(folder))
        )
    except OSError:
        return False


def context_window_of(config: Mapping[str, Any]) -> int | None:
    """The context length a HF config.json declares, looking into ``text_config`` for vision models."""
    for section in (config, config.get("text_config")):
        if isinstance(section, Mapping):
            for key in CONTEXT_KEYS:
                value = section.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
    return None


def read_model_spec(model_id: str, folder: Path) -> ModelSpec:
    """The spec of a model folder; ValueError when its config.json or weights cannot be read."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        weight_bytes = sum(p.stat().st_size for p in _weights(folder))
        is_vision = (folder / "preprocessor_config.json").is_file()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {folder / 'config.json'} or its weights: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{folder / 'config.json'} is not a JSON object")
    model_type = config.get("model_type")
    return ModelSpec(
        id=model_id,
        path=folder,
        config=config,
        context_window=context_window_of(config),
        weight_bytes=weight_bytes,
        model_type=model_type if isinstance(model_type, str) else None,
        is_vision=is_vision or isinstance(config.get("vision_config"), dict),
    )


def estimate_memory_bytes(spec: ModelSpec, model_config: ModelConfig | None, safety_margin: float) -> int:
    """Configured ``required_memory_gb`` (GiB) when set, else the weight size times the safety margin."""
    if model_config is not None and model_config.required_memory_gb is not None:
        return math.ceil(model_config.required_memory_gb * 1024**3)
    return math.ceil(spec.weight_bytes * safety_margin)


def _subdirs(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_dir())
    except OSError:
        return []


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _hf_id(name: str) -> str:
    org, _, repo = name.removeprefix(HF_PREFIX).partition("--")
    return f"{org}/{repo}" if repo else org


def _hf_snapshot(repo: Path) -> Path | None:
    """The snapshot ``refs/main`` names when it is complete, else the newest complete one."""
    try:
        ref = (repo / "refs" / "main").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        ref = ""
    if ref and is_safe_model_id(ref) and "/" not in ref and is_model_folder(repo / "snapshots" / ref):
        return repo / "snapshots" / ref
    complete = [s for s in _subdirs(repo / "snapshots") if is_model_folder(s)]
    return max(complete, key=_mtime) if complete else None


def _candidates(root: Path) -> Iterator[tuple[str, Path]]:
    """(id, folder) for every model under the directory: direct and nested folders first, then the HF cache."""
    cache: list[Path] = []
    for entry in _subdirs(root):
        if entry.name.startswith(HF_PREFIX):
            cache.append(entry)
        elif is_model_folder(entry):
            yield entry.name, entry
        else:
            for child in _subdirs(entry):
                if child.name.startswith(HF_PREFIX):
                    cache.append(child)
                elif is_model_folder(child):
                    yield f"{entry.name}/{child.name}", child
    for repo in cache:
        if (snapshot := _hf_snapshot(repo)) is not None:
            yield _hf_id(repo.name), snapshot


class ModelRegistry:
    """Ids and aliases to model folders, from a cached scan refreshed on a miss. Thread-safe."""

    def __init__(
        self, settings: Settings, *, rescan_interval: float = 2.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self._interval = rescan_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._specs: dict[str, ModelSpec] = {}
        self._names: dict[str, str] = {}  # id, alias or short id -> id
        self._scanned_at: float | None = None
        self._warned: set[str] = set()

    def scan(self) -> dict[str, ModelSpec]:
        """Rescan the disk (blocking filesystem work: run it off the event loop); id -> spec."""
        with self._lock:
            self._scan()
            return dict(self._specs)

    def resolve(self, model_id: str) -> ModelSpec | None:
        """The model an id or alias names; on a miss, rescans when the last scan is older than the interval."""
        if not is_safe_model_id(model_id):
            return None
        with self._lock:
            spec = self._lookup(model_id)
            if spec is None and (self._scanned_at is None or self._clock() - self._scanned_at >= self._interval):
                self._scan()
                spec = self._lookup(model_id)
            return spec

    def known(self, model_id: str) -> ModelSpec | None:
        """The model an id or alias names in the last scan, without touching the disk, so the event loop may call it;
        None on a miss, and while a rescan holds the registry (then `resolve` in a worker thread answers)."""
        if not is_safe_model_id(model_id) or not self._lock.acquire(blocking=False):
            return None
        try:
            return self._lookup(model_id)
        finally:
            self._lock.release()

    def _lookup(self, model_id: str) -> ModelSpec | None:  # the caller holds the lock
        found = self._names.get(model_id)
        return self._specs[found] if found is not None else None

    def config_for(self, spec: ModelSpec) -> ModelConfig | None:
        """The ``models.<id>`` config entry of a model, by its id, else by one of its aliases."""
        for name in (spec.id, *spec.aliases):
            if name in self.settings.models:
                return self.settings.models[name]
        return None

    def _warn(self, message: str) -> None:
        if message not in self._warned:  # each problem once, not on every rescan
            self._warned.add(message)
            logger.warning(message)

    def _add(self, found: dict[str, ModelSpec], model_id: str, folder: Path, root: Path | None) -> None:
        if model_id in found:
            self._warn(f"model {model_id!r}: using {found[model_id].path}, ignoring {folder} with the same id")
            return
        if not is_safe_model_id(model_id):
            self._warn(f"skipping {folder}: {model_id!r} is not a usable model id")
            return
        if not is_model_folder(folder):
            where = f"models.{model_id}.path: " if root is None else ""
            self._warn(f"{where}skipping {folder}: not a model folder (config.json, *.safetensors, tokenizer)")
            return
        real = folder.resolve()
        if root is not None and not real.is_relative_to(root):
            self._warn(
                f"skipping {folder}: it resolves to {real}, outside the model directory {root}; "
                f'set "path" in models.{model_id} of the config to use it'
            )
            return
        try:
            found[model_id] = read_model_spec(model_id, real)
        except ValueError as exc:
            self._warn(f"skipping model {model_id!r}: {exc}")

    def _scan(self) -> None:
        found: dict[str, ModelSpec] = {}
        for model_id, model in self.settings.models.items():
            if model.path is not None:
                self._add(found, model_id, Path(model.path), None)
        directory = self.settings.model_directory
        if directory is not None and directory.is_dir():
            root = directory.resolve()
            for model_id, folder in _candidates(directory):
                self._add(found, model_id, folder, root)
        names = {model_id: model_id for model_id in found}
        aliases: dict[str, list[str]] = {model_id: [] for model_id in found}
        for model_id, model in self.settings.models.items():
            for alias in model.alias if model_id in found else ():
                if names.setdefault(alias, model_id) != model_id:
                    self._warn(f"alias {alias!r} of {model_id!r} ignored: it already names {names[alias]!r}")
                elif alias != model_id:
                    aliases[model_id].append(alias)
        shorts: dict[str, list[str]] = {}
        for model_id in found:
            if "/" in model_id:
                shorts.setdefault(model_id.rsplit("/", 1)[1], []).append(model_id)
        for short, owners in shorts.items():
            if len(owners) == 1 and short not in names:
                names[short] = owners[0]
                aliases[owners[0]].append(short)
        added = found.keys() - self._specs.keys()
        if self._scanned_at is not None and added:
            logger.info("new models found: {}", ", ".join(sorted(added)))
        self._specs = {model_id: replace(spec, aliases=tuple(aliases[model_id])) for model_id, spec in found.items()}
        self._names = names
        self._scanned_at = self._clock()

    def list(self) -> builtins.list[ModelSpec]:
        """Every model, sorted by id, from a scan at most `rescan_interval` old (blocking: run it off the loop)."""
        with self._lock:
            if self._scanned_at is None or self._clock() - self._scanned_at >= self._interval:
                self._scan()
            return sorted(self._specs.values(), key=lambda spec: spec.id)
