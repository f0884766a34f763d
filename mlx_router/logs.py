"""Loguru set-up: console plus a rotating file, every line tagged with the request id of its request."""

from __future__ import annotations

import sys
from pathlib import Path

from loguru import logger

FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {extra[request_id]} | {message}"


def setup_logging(level: str, log_dir: Path | None) -> None:
    """Replace loguru's default sink; `log_dir=None` logs to the console only (tests)."""
    logger.remove()
    logger.configure(extra={"request_id": "-"})
    logger.add(sys.stderr, level=level, format=FORMAT, backtrace=False, diagnose=False)
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        logger.add(
            log_dir / "mlx-router.log",
            level=level,
            format=FORMAT,
            rotation="20 MB",
            retention=5,
            enqueue=True,
            backtrace=False,
            diagnose=False,
        )
