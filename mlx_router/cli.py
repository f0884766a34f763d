"""The ``mlx-router`` command: arguments, settings, then the server."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from mlx_router import __version__
from mlx_router.config.settings import ConfigError, Settings, load_settings


def build_parser() -> argparse.ArgumentParser:
    """``mlx-router [--config PATH] [--host H] [--port P] [--model-dir DIR] [--log-level L]``, ``--version``."""
    parser = argparse.ArgumentParser(
        prog="mlx-router",
        description="Serve the MLX models of a folder behind one OpenAI-compatible endpoint, loading them on demand.",
    )
    parser.add_argument("--config", type=Path, default=None, metavar="PATH", help="config.json (default: none)")
    parser.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port to listen on (default 8800)")
    parser.add_argument("--model-dir", default=None, metavar="DIR", help="folder of the models (default ./models)")
    parser.add_argument(
        "--log-level",
        type=str.upper,
        default=None,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="least severe level logged (default INFO)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def settings_from_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ) -> Settings:
    """Parse the command line and load the settings; a config problem exits with status 2 and one message."""
    args = build_parser().parse_args(argv)
    overrides = {"host": args.host, "port": args.port, "model_directory": args.model_dir, "log_level": args.log_level}
    try:
        return load_settings(args.config, environ=environ, overrides=overrides)
    except ConfigError as exc:
        print(f"mlx-router: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Load settings, set up logging and serve until interrupted."""
    settings = settings_from_args(argv)
    import uvicorn

    from mlx_router.app import create_app
    from mlx_router.logs import setup_logging

    level = "DEBUG" if settings.server.debug else settings.server.log_level
    setup_logging(level, Path(settings.server.log_dir))
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", access_log=False)
    return 0
