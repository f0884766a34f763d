"""Settings: built-in defaults < config file < environment < overrides (CLI flags), as one frozen object.

The file keeps the legacy layout ``{"defaults": {...}, "server": {...}, "models": {"<id>": {...}}}``; every problem
is a `ConfigError` naming the source (file, environment variable or flag), the key path and the problem.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

Family = Literal["llama3", "qwen", "chatml", "deepseek", "phi4", "mistral", "gemma", "gpt-oss", "generic"]
FAMILIES: tuple[str, ...] = get_args(Family)
PressureLevel = Literal["normal", "moderate", "high", "critical"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
DEFAULT_MODEL_DIRECTORY = "models"  # relative to the working directory; may be absent

ENV_VARS: dict[str, tuple[str, str]] = {  # variable -> key path it sets
    "MLX_MODEL_DIR": ("defaults", "model_directory"),
    "MLX_ROUTER_HOST": ("server", "ip"),
    "MLX_ROUTER_PORT": ("server", "port"),
    "MLX_ROUTER_LOG_LEVEL": ("server", "log_level"),
    "MLX_ROUTER_CACHE_SIZE": ("defaults", "cache_size"),
    "MLX_ROUTER_MEMORY_BUDGET_GB": ("defaults", "memory_budget_gb"),
}
OVERRIDES: dict[str, tuple[tuple[str, str], str]] = {  # override name -> (key path, command-line flag)
    "host": (("server", "ip"), "--host"),
    "port": (("server", "port"), "--port"),
    "model_directory": (("defaults", "model_directory"), "--model-dir"),
    "log_level": (("server", "log_level"), "--log-level"),
}


class ConfigError(Exception):
    """A configuration problem; `str()` reads ``<source>: <key.path>: <problem>``."""

    def __init__(self, source: str, key: str | None, problem: str, *, more: tuple[str, ...] = ()) -> None:
        self.source, self.key, self.problem = source, key, problem
        first = f"{source}: {key}: {problem}" if key else f"{source}: {problem}"
        super().__init__("\n".join((first, *more)))


def expand_path(value: str) -> Path:
    """`~` and environment variables expanded, made absolute against the working directory."""
    return Path(os.path.expanduser(os.path.expandvars(value))).absolute()


def is_safe_model_id(model_id: str) -> bool:
    """True when the id cannot name anything outside the model directory (no `..`, `\\`, NUL, absolute path)."""
    if not isinstance(model_id, str) or not model_id or len(model_id) > 512 or model_id[0] in "/~":
        return False
    if any(ord(c) < 32 or c == "\\" for c in model_id) or (model_id[1:2] == ":" and model_id[0].isalpha()):
        return False
    return all(part not in ("", ".", "..") for part in model_id.split("/"))


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


PathStr = Annotated[str | None, AfterValidator(lambda v: str(expand_path(v.strip())) if v and v.strip() else None)]


class DefaultsConfig(_Frozen):
    max_tokens: int = Field(default=4096, gt=0, description="Completion token limit unless request or model set one.")
    timeout: float = Field(default=300.0, gt=0, description="Per-request generation timeout, in seconds.")
    cache_size: int = Field(default=2, ge=1, description="Most models resident at once.")
    memory_threshold_gb: float | None = Field(default=None, gt=0, description="Legacy: free-memory floor in GB.")
    safety_margin: float = Field(default=1.2, ge=1.0, description="Weight size factor estimating a model's memory.")
    swap_critical_percent: float = Field(default=90.0, ge=0, le=100, description="Swap use (%) that is critical.")
    swap_high_percent: float = Field(default=75.0, ge=0, le=100, description="Swap use (%) that is high pressure.")
    stream: bool = Field(default=False, description="Stream when the request omits `stream`.")
    stream_chunk_size: int = Field(default=1, ge=1, description="Most tokens merged into one chunk when clients lag.")
    streaming_format: Literal["sse", "json_lines", "json_array"] = Field(default="sse", description="Stream format.")
    warmup_tokens: int = Field(default=0, ge=0, description="Tokens generated right after a load, to warm up.")
    enable_function_calling: bool = Field(default=True, description="Accept `tools` in requests.")
    model: str | None = Field(default=None, description="Model to preload at start-up.")
    model_directory: PathStr = Field(default=None, description="Folder of the models (`~`, $VARS expanded).")
    memory_budget_gb: float | None = Field(default=None, gt=0, description="Cap for resident models; null: 75% RAM.")
    max_batch_size: int = Field(default=32, ge=1, description="Most sequences decoded together by one model.")
    max_queued_requests: int = Field(default=64, ge=1, description="Most requests waiting per model.")
    prefix_cache_gb: float | None = Field(default=None, ge=0, description="Prompt prefix cache; null: automatic.")
    idle_cache_release_s: float | None = Field(
        default=2.0, ge=0, description="Idle seconds before a model gives MLX's cached buffers back; null: never."
    )

    @field_validator("swap_high_percent")
    @classmethod
    def _swap_order(cls, value: float, info: ValidationInfo) -> float:
        critical = info.data.get("swap_critical_percent")
        if critical is not None and value > critical:
            raise ValueError(f"must be <= swap_critical_percent ({critical})")
        return value


class ServerConfig(_Frozen):
    ip: str = Field(default="127.0.0.1", min_length=1, description="Address to listen on.")
    port: int = Field(default=8800, ge=1, le=65535, description="TCP port to listen on.")
    debug: bool = Field(default=False, description="Debug mode.")
    log_level: LogLevel = Field(default="INFO", description="Least severe level logged.")
    log_dir: str = Field(default="logs", description="Folder for log files.")
    cors_origins: list[str] = Field(default_factory=list, description="Origins allowed by CORS; empty: CORS off.")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return {"WARN": "WARNING"}.get(level := value.strip().upper(), level) if isinstance(value, str) else value


class ModelConfig(_Frozen):
    max_tokens: int | None = Field(default=None, gt=0, description="Completion token limit for this model.")
    temp: float | None = Field(default=None, ge=0, le=2, description="Default sampling temperature.")
    top_p: float | None = Field(default=None, ge=0, le=1, description="Default nucleus sampling threshold.")
    top_k: int | None = Field(default=None, ge=0, description="Default top-k (0: off).")
    min_p: float | None = Field(default=None, ge=0, le=1, description="Default min-p (0: off).")
    chat_template: Family | None = Field(default=None, description="Chat template family, overriding detection.")
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra chat template arguments.")
    family: Family | None = Field(default=None, description="Model family (tool-call and reasoning parsing).")
    reasoning_response: Literal["enable", "disable"] | None = Field(default=None, description="Keep/strip reasoning.")
    required_memory_gb: float | None = Field(default=None, gt=0, description="Memory this model needs, in GiB.")
    supports_tools: bool | None = Field(default=None, description="Whether the model handles tools; null: detect.")
    supports_vision: bool | None = Field(default=None, description="Whether the model takes images; null: detect.")
    memory_pressure_max_tokens: dict[PressureLevel, Annotated[int, Field(gt=0)]] | None = Field(
        default=None, description="Token limit per memory-pressure level (normal/moderate/high/critical)."
    )
    alias: tuple[str, ...] = Field(default=(), description="Other names for this model (a string or a list).")
    path: PathStr = Field(default=None, description="Explicit model folder, overriding discovery (may lie anywhere).")
    pinned: bool = Field(default=False, description="Never evict this model.")

    @field_validator("chat_template", "family", mode="before")
    @classmethod
    def _family(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value.strip().lower() not in FAMILIES:
                raise ValueError(f"unknown family name {value!r}; expected one of: {', '.join(FAMILIES)}")
            return value.strip().lower()
        return value

    @field_validator("alias", mode="before")
    @classmethod
    def _alias(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value


class Settings(_Frozen):
    defaults: DefaultsConfig = Field(default=DefaultsConfig(), description="Server-wide defaults.")
    server: ServerConfig = Field(default=ServerConfig(), description="Listening socket and logging.")
    models: dict[str, ModelConfig] = Field(default_factory=dict, description="Per-model settings, by model id.")
    config_path: Path | None = Field(default=None, description="File these settings were read from, if any.")

    @property
    def host(self) -> str:
        return self.server.ip

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def model_directory(self) -> Path | None:
        return Path(self.defaults.model_directory) if self.defaults.model_directory else None


def load_settings(
    config_path: Path | None, *, environ: Mapping[str, str] = os.environ, overrides: Mapping[str, Any] | None = None
) -> Settings:
    """Merge defaults < file < environment < overrides; `None` override values mean "not given"."""
    source = str(config_path) if config_path is not None else "settings"
    raw = _read_file(config_path) if config_path is not None else {}
    for key in raw:
        if key not in _SECTIONS:
            raise ConfigError(source, key, "unknown key" + _hint(key, _SECTIONS))
    layers = [(path, environ.get(var, "").strip(), f"environment variable {var}") for var, path in ENV_VARS.items()]
    for name, value in (overrides or {}).items():
        if name not in OVERRIDES:
            raise ValueError(f"unknown override {name!r}; expected one of {sorted(OVERRIDES)}")
        layers.append((OVERRIDES[name][0], value, f"command-line option {OVERRIDES[name][1]}"))
    sources: dict[tuple[str, ...], str] = {}
    for path, value, where in layers:  # None or "" means not given
        if value is not None and value != "" and isinstance(section := raw.setdefault(path[0], {}), dict):
            section[path[1]] = str(value) if isinstance(value, Path) else value
            sources[path] = where
    try:
        settings = Settings.model_validate({**raw, "config_path": config_path})
    except ValidationError as exc:
        raise _from_validation(exc, source, sources) from None
    _check_ids(settings, source)
    directory = settings.model_directory
    if directory is None:
        defaults = settings.defaults.model_copy(update={"model_directory": str(expand_path(DEFAULT_MODEL_DIRECTORY))})
        return settings.model_copy(update={"defaults": defaults})
    if not directory.is_dir():
        problem = "is not a directory" if directory.exists() else "directory does not exist"
        where = sources.get(("defaults", "model_directory"), source)
        raise ConfigError(where, "defaults.model_directory", f"{problem}: {directory}")
    return settings


class _Obj(dict[str, Any]):
    """A JSON object that remembers the first key it saw twice."""

    dup: str | None = None


def _pairs(pairs: list[tuple[str, Any]]) -> _Obj:
    obj = _Obj(pairs)
    if len(obj) < len(pairs):
        obj.dup = next(key for i, (key, _) in enumerate(pairs) if key in dict(pairs[:i]))
    return obj


def _find_dup(value: Any, path: tuple[str, ...]) -> tuple[str, ...] | None:
    if isinstance(value, _Obj) and value.dup is not None:
        return (*path, value.dup)
    for key, item in value.items() if isinstance(value, dict) else ():
        if found := _find_dup(item, (*path, key)):
            return found
    return None


def _read_file(path: Path) -> dict[str, Any]:
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, None, f"cannot read config file: {exc}") from None
    try:
        data = json.loads(text, object_pairs_hook=_pairs)
    except json.JSONDecodeError as exc:
        raise ConfigError(source, None, f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(source, None, "the top level must be a JSON object")
    if dup := _find_dup(data, ()):
        what = "two models claim the id" if len(dup) == 2 and dup[0] == "models" else "duplicate key"
        raise ConfigError(source, ".".join(dup), f"{what} {dup[-1]!r}")
    return data


def _hint(key: str, choices: Iterable[str]) -> str:
    names = list(choices)
    close = [n for n in names if key.startswith(n) or n.startswith(key)] or difflib.get_close_matches(key, names, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


_SECTIONS: dict[str, type[BaseModel]] = {"defaults": DefaultsConfig, "server": ServerConfig, "models": ModelConfig}


def _from_validation(exc: ValidationError, source: str, sources: Mapping[tuple[str, ...], str]) -> ConfigError:
    found: list[tuple[str, str, str]] = []
    for err in exc.errors():
        loc = tuple(str(part) for part in err["loc"] if part != "[key]")  # pydantic marks bad dict keys "[key]"
        if err["type"] == "extra_forbidden":
            depth = 3 if loc[0] == "models" else 2
            model = _SECTIONS.get(loc[0]) if len(loc) == depth else None
            problem = "unknown key" + (_hint(loc[-1], model.model_fields) if model else "")
        else:
            shown = repr(err["input"])
            problem = f"{err['msg'].removeprefix('Value error, ')} (got {shown[:80]})"
        found.append((sources.get(loc[:2], source), ".".join(loc), problem))
    more = tuple(f"{src}: {key}: {problem}" for src, key, problem in found[1:])
    return ConfigError(*found[0], more=more)


def _check_ids(settings: Settings, source: str) -> None:
    claimed: dict[str, str] = {}
    for model_id, model in settings.models.items():
        if not is_safe_model_id(model_id):
            raise ConfigError(source, f"models.{model_id}", "unsafe model id (no '..', '\\', NUL or absolute path)")
        for alias in model.alias:
            key = f"models.{model_id}.alias"
            if not is_safe_model_id(alias):
                raise ConfigError(source, key, f"unsafe alias {alias!r}")
            if alias != model_id and alias in settings.models:
                raise ConfigError(source, key, f"alias {alias!r} is already the id of models.{alias}")
            if claimed.setdefault(alias, model_id) != model_id:
                raise ConfigError(source, key, f"alias {alias!r} is also claimed by models.{claimed[alias]}")
