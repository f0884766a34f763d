"""Settings: defaults, the legacy config file, precedence, and every kind of config error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from mlx_router import cli
from mlx_router.config.settings import (
    FAMILIES,
    ConfigError,
    DefaultsConfig,
    ModelConfig,
    ServerConfig,
    Settings,
    is_safe_model_id,
    load_settings,
)


def write(tmp_path: Path, data: Any, name: str = "config.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=2))
    return path


def error_of(path: Path | None, **kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_settings(path, **kwargs)
    return info.value


# --- defaults -----------------------------------------------------------------------------------------------------


def test_every_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings(None, environ={})
    d = s.defaults
    assert (d.max_tokens, d.timeout, d.cache_size, d.memory_threshold_gb) == (4096, 300.0, 2, None)
    assert (d.safety_margin, d.swap_critical_percent, d.swap_high_percent) == (1.2, 90.0, 75.0)
    assert (d.stream, d.stream_chunk_size, d.streaming_format, d.warmup_tokens) == (False, 1, "sse", 0)
    assert (d.enable_function_calling, d.model) == (True, None)
    assert (d.memory_budget_gb, d.max_batch_size, d.max_queued_requests, d.prefix_cache_gb) == (None, 32, 64, None)
    assert d.idle_cache_release_s == 2.0
    srv = s.server
    assert (srv.ip, srv.port, srv.debug, srv.log_level, srv.log_dir, srv.cors_origins) == (
        "127.0.0.1",
        8800,
        False,
        "INFO",
        "logs",
        [],
    )
    assert s.models == {} and s.config_path is None
    assert (s.host, s.port) == ("127.0.0.1", 8800)
    # No directory given anywhere: ./models of the working directory, which need not exist (and is not created).
    assert s.model_directory == Path.cwd() / "models" == tmp_path.resolve() / "models"
    assert not (tmp_path / "models").exists()


def test_model_config_defaults() -> None:
    m = ModelConfig()
    assert m.alias == () and m.chat_template_kwargs == {} and m.pinned is False
    for name in ("max_tokens", "temp", "top_p", "top_k", "min_p", "chat_template", "family", "reasoning_response"):
        assert getattr(m, name) is None
    for name in ("required_memory_gb", "supports_tools", "supports_vision", "memory_pressure_max_tokens", "path"):
        assert getattr(m, name) is None


def test_settings_are_frozen_and_described() -> None:
    s = Settings()
    with pytest.raises(ValidationError):
        s.defaults.cache_size = 3
    with pytest.raises(ValidationError):
        s.server = ServerConfig()
    for model in (DefaultsConfig, ServerConfig, ModelConfig, Settings):
        assert all(field.description for field in model.model_fields.values()), model


def test_empty_file_is_defaults(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, {}), environ={})
    assert s.defaults == DefaultsConfig(model_directory=s.defaults.model_directory)
    assert s.config_path == tmp_path / "config.json"


# --- the legacy config --------------------------------------------------------------------------------------------


def legacy(model_dir: Path) -> dict[str, Any]:
    return {
        "defaults": {
            "max_tokens": 8192,
            "timeout": 120,
            "cache_size": 2,
            "memory_threshold_gb": 16.0,
            "safety_margin": 1.2,
            "swap_critical_percent": 90.0,
            "swap_high_percent": 75.0,
            "stream": False,
            "stream_chunk_size": 8,
            "streaming_format": "sse",
            "warmup_tokens": 5,
            "enable_function_calling": True,
            "model_directory": str(model_dir),
        },
        "server": {"ip": "0.0.0.0", "port": 8888, "debug": False},
        "models": {
            "mlx-community/Qwen3-30B-A3B-8bit": {
                "max_tokens": 8192,
                "temp": 0.7,
                "top_p": 0.9,
                "top_k": 20,
                "min_p": 0.05,
                "chat_template": "qwen",
                "reasoning_response": "disable",
                "required_memory_gb": 32,
                "supports_tools": True,
                "memory_pressure_max_tokens": {"normal": 8192, "moderate": 4096, "high": 2048, "critical": 1024},
            },
            "mlx-community/Llama-3.3-70B-Instruct-4bit": {
                "max_tokens": 4096,
                "temp": 0.6,
                "chat_template": "llama3",
                "required_memory_gb": 40,
                "supports_vision": False,
            },
        },
    }


def test_legacy_config_loads_unchanged(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, legacy(tmp_path)), environ={})
    assert (s.defaults.max_tokens, s.defaults.timeout, s.defaults.stream_chunk_size) == (8192, 120.0, 8)
    assert (s.defaults.memory_threshold_gb, s.defaults.warmup_tokens) == (16.0, 5)
    assert (s.host, s.port, s.model_directory) == ("0.0.0.0", 8888, tmp_path)
    qwen = s.models["mlx-community/Qwen3-30B-A3B-8bit"]
    assert (qwen.temp, qwen.top_k, qwen.chat_template, qwen.reasoning_response) == (0.7, 20, "qwen", "disable")
    assert qwen.required_memory_gb == 32 and qwen.supports_tools is True
    assert qwen.memory_pressure_max_tokens == {"normal": 8192, "moderate": 4096, "high": 2048, "critical": 1024}
    llama = s.models["mlx-community/Llama-3.3-70B-Instruct-4bit"]
    assert (llama.chat_template, llama.required_memory_gb, llama.supports_vision) == ("llama3", 40, False)


# --- normalisation ------------------------------------------------------------------------------------------------


def test_alias_string_or_list_becomes_tuple(tmp_path: Path) -> None:
    data = {"models": {"a": {"alias": "one"}, "b": {"alias": ["two", "three"]}}}
    s = load_settings(write(tmp_path, data), environ={})
    assert s.models["a"].alias == ("one",) and s.models["b"].alias == ("two", "three")


def test_paths_expand_user_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("SOME_DIR", str(tmp_path / "sub"))
    (tmp_path / "sub").mkdir()
    data = {"defaults": {"model_directory": "~"}, "models": {"m": {"path": "$SOME_DIR/m"}}}
    s = load_settings(write(tmp_path, data), environ={})
    assert s.model_directory == tmp_path
    assert s.models["m"].path == str(tmp_path / "sub" / "m")


def test_family_names_case_insensitive() -> None:
    m = ModelConfig.model_validate({"chat_template": "Llama3", "family": " GPT-OSS "})
    assert (m.chat_template, m.family) == ("llama3", "gpt-oss")
    assert set(FAMILIES) == {"llama3", "qwen", "chatml", "deepseek", "phi4", "mistral", "gemma", "gpt-oss", "generic"}


# --- precedence ---------------------------------------------------------------------------------------------------


def test_precedence_defaults_file_env_overrides(tmp_path: Path) -> None:
    dirs = [tmp_path / n for n in ("file", "env", "flag")]
    for d in dirs:
        d.mkdir()
    cfg = write(
        tmp_path,
        {
            "defaults": {"model_directory": str(dirs[0]), "cache_size": 3, "memory_budget_gb": 10},
            "server": {"ip": "10.0.0.1", "port": 9000, "log_level": "ERROR"},
        },
    )
    assert load_settings(None, environ={}).port == 8800
    s = load_settings(cfg, environ={})
    assert (s.host, s.port, s.model_directory, s.server.log_level) == ("10.0.0.1", 9000, dirs[0], "ERROR")
    env = {
        "MLX_MODEL_DIR": str(dirs[1]),
        "MLX_ROUTER_HOST": "10.0.0.2",
        "MLX_ROUTER_PORT": "9001",
        "MLX_ROUTER_LOG_LEVEL": "debug",
        "MLX_ROUTER_CACHE_SIZE": "4",
        "MLX_ROUTER_MEMORY_BUDGET_GB": "12.5",
    }
    s = load_settings(cfg, environ=env)
    assert (s.host, s.port, s.model_directory, s.server.log_level) == ("10.0.0.2", 9001, dirs[1], "DEBUG")
    assert (s.defaults.cache_size, s.defaults.memory_budget_gb) == (4, 12.5)
    flags = {"host": "10.0.0.3", "port": 9002, "model_directory": str(dirs[2]), "log_level": "WARNING"}
    s = load_settings(cfg, environ=env, overrides=flags)
    assert (s.host, s.port, s.model_directory, s.server.log_level) == ("10.0.0.3", 9002, dirs[2], "WARNING")
    assert s.defaults.cache_size == 4  # not overridable by flag: the environment value stands
    # None means "flag not given"; an empty environment variable means "not set".
    s = load_settings(cfg, environ={"MLX_ROUTER_PORT": ""}, overrides={"port": None, "host": None})
    assert (s.host, s.port) == ("10.0.0.1", 9000)


def test_unknown_override_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown override"):
        load_settings(None, environ={}, overrides={"cache_size": 3})


# --- errors -------------------------------------------------------------------------------------------------------


def test_bad_json_names_file_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, '{\n  "defaults": {\n    "max_tokens": 10,\n  }\n}')
    err = error_of(path, environ={})
    assert str(path) in str(err) and "invalid JSON" in str(err) and "line 4" in str(err) and "column" in str(err)


def test_missing_or_non_object_file(tmp_path: Path) -> None:
    assert "cannot read config file" in str(error_of(tmp_path / "nope.json", environ={}))
    assert "must be a JSON object" in str(error_of(write(tmp_path, "[1, 2]"), environ={}))


@pytest.mark.parametrize(
    ("data", "key", "problem"),
    [
        ({"default": {}}, "default", "unknown key (did you mean 'defaults'?)"),
        ({"defaults": {"cache_sise": 2}}, "defaults.cache_sise", "unknown key (did you mean 'cache_size'?)"),
        ({"server": {"host": "x"}}, "server.host", "unknown key"),
        ({"models": {"llama": {"temperature": 1}}}, "models.llama.temperature", "unknown key (did you mean 'temp'?)"),
        ({"defaults": {"cache_size": 0}}, "defaults.cache_size", "greater than or equal to 1 (got 0)"),
        ({"defaults": {"max_tokens": "lots"}}, "defaults.max_tokens", "valid integer"),
        ({"defaults": {"timeout": 0}}, "defaults.timeout", "greater than 0"),
        ({"defaults": {"safety_margin": 0.5}}, "defaults.safety_margin", "greater than or equal to 1"),
        ({"defaults": {"swap_high_percent": 95}}, "defaults.swap_high_percent", "<= swap_critical_percent"),
        ({"defaults": {"swap_critical_percent": 101}}, "defaults.swap_critical_percent", "less than or equal to 100"),
        ({"defaults": {"streaming_format": "xml"}}, "defaults.streaming_format", "'sse'"),
        ({"defaults": {"memory_budget_gb": -1}}, "defaults.memory_budget_gb", "greater than 0"),
        ({"server": {"port": 70000}}, "server.port", "less than or equal to 65535"),
        ({"server": {"log_level": "LOUD"}}, "server.log_level", "'DEBUG'"),
        ({"models": {"llama": {"temp": 3}}}, "models.llama.temp", "less than or equal to 2 (got 3)"),
        ({"models": {"llama": {"top_p": 1.5}}}, "models.llama.top_p", "less than or equal to 1"),
        ({"models": {"llama": {"chat_template": "llama2"}}}, "models.llama.chat_template", "unknown family name"),
        ({"models": {"llama": {"family": "foo"}}}, "models.llama.family", "unknown family name 'foo'"),
        ({"models": {"m": {"reasoning_response": "yes"}}}, "models.m.reasoning_response", "'enable'"),
        (
            {"models": {"m": {"memory_pressure_max_tokens": {"normal": 0}}}},
            "models.m.memory_pressure_max_tokens.normal",
            "greater than 0",
        ),
        (
            {"models": {"m": {"memory_pressure_max_tokens": {"extreme": 5}}}},
            "models.m.memory_pressure_max_tokens.extreme",
            "'normal'",
        ),
        ({"models": {"m": {"alias": ["x", "m2"]}, "m2": {}}}, "models.m.alias", "already the id of models.m2"),
        ({"models": {"a": {"alias": "x"}, "b": {"alias": ["x"]}}}, "models.b.alias", "also claimed by models.a"),
        ({"models": {"../evil": {}}}, "models.../evil", "unsafe model id"),
        ({"models": {"m": {"alias": "/etc"}}}, "models.m.alias", "unsafe alias"),
    ],
)
def test_value_errors_name_file_key_and_problem(tmp_path: Path, data: Any, key: str, problem: str) -> None:
    path = write(tmp_path, data)
    err = error_of(path, environ={})
    assert err.source == str(path) and err.key == key and problem in err.problem, str(err)
    assert str(err).startswith(f"{path}: {key}: ")


def test_two_models_with_the_same_id(tmp_path: Path) -> None:
    path = write(tmp_path, '{"models": {"llama": {"temp": 0.1}, "qwen": {}, "llama": {"temp": 0.2}}}')
    err = error_of(path, environ={})
    assert (err.key, err.problem) == ("models.llama", "two models claim the id 'llama'")
    path = write(tmp_path, '{"server": {"port": 1, "port": 2}}')
    assert error_of(path, environ={}).key == "server.port"


def test_several_errors_are_all_reported(tmp_path: Path) -> None:
    err = error_of(write(tmp_path, {"defaults": {"cache_size": 0}, "server": {"port": 0}}), environ={})
    assert "defaults.cache_size" in str(err) and "server.port" in str(err)


def test_missing_model_directory(tmp_path: Path) -> None:
    path = write(tmp_path, {"defaults": {"model_directory": str(tmp_path / "missing")}})
    err = error_of(path, environ={})
    assert (err.source, err.key) == (str(path), "defaults.model_directory")
    assert "does not exist" in err.problem and "missing" in err.problem
    err = error_of(write(tmp_path, {"defaults": {"model_directory": str(path)}}), environ={})
    assert "not a directory" in err.problem


def test_env_errors_name_the_variable(tmp_path: Path) -> None:
    err = error_of(None, environ={"MLX_ROUTER_PORT": "abc"})
    assert err.source == "environment variable MLX_ROUTER_PORT" and err.key == "server.port"
    assert "'abc'" in str(err)
    err = error_of(write(tmp_path, {}), environ={"MLX_ROUTER_CACHE_SIZE": "0"})
    assert err.source == "environment variable MLX_ROUTER_CACHE_SIZE"
    err = error_of(None, environ={"MLX_MODEL_DIR": str(tmp_path / "gone")})
    assert err.source == "environment variable MLX_MODEL_DIR" and "does not exist" in err.problem
    err = error_of(None, environ={}, overrides={"port": 0})
    assert err.source == "command-line option --port"


@pytest.mark.parametrize(
    ("model_id", "safe"),
    [
        ("llama", True),
        ("mlx-community/Qwen3-30B-A3B-8bit", True),
        ("qwen:7b", True),
        ("v1.5", True),
        ("", False),
        ("..", False),
        ("../x", False),
        ("a/../../b", False),
        ("/etc", False),
        ("~root", False),
        ("a\\b", False),
        ("a\x00b", False),
        ("a//b", False),
        ("a/", False),
        ("./a", False),
        ("C:x", False),
    ],
)
def test_is_safe_model_id(model_id: str, safe: bool) -> None:
    assert is_safe_model_id(model_id) is safe


# --- cli ----------------------------------------------------------------------------------------------------------


def test_cli_flags_reach_settings(tmp_path: Path) -> None:
    argv = ["--host", "0.0.0.0", "--port", "1234", "--model-dir", str(tmp_path), "--log-level", "debug"]
    s = cli.settings_from_args(argv, environ={})
    assert (s.host, s.port, s.model_directory, s.server.log_level) == ("0.0.0.0", 1234, tmp_path, "DEBUG")
    args = cli.build_parser().parse_args([])
    assert args.config is None


def test_cli_config_error_exits_2_with_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, {"defaults": {"cache_size": 0}})
    with pytest.raises(SystemExit) as info:
        cli.settings_from_args(["--config", str(path)], environ={})
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mlx-router: config error: {path}: defaults.cache_size: ")
    assert "Traceback" not in err


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("mlx-router ")
