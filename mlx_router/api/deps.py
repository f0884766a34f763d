"""Typed dependencies that read the objects `create_app` stored on app.state.

They are `async def` so FastAPI calls them inline: a plain `def` dependency runs in the thread pool, a thread hop
(and a GIL hand-over with the engine threads) per dependency per request."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ..config.settings import Settings
from ..core.manager import MLXModelManager
from .middleware import RequestStats


async def _manager(request: Request) -> MLXModelManager:
    manager: MLXModelManager = request.app.state.manager
    return manager


async def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def _stats(request: Request) -> RequestStats:
    stats: RequestStats = request.app.state.stats
    return stats


async def request_id(request: Request) -> str:
    """The id the request-id middleware assigned (also sent back as X-Request-ID)."""
    return str(request.scope.get("state", {}).get("request_id", "-"))


ManagerDep = Annotated[MLXModelManager, Depends(_manager)]
SettingsDep = Annotated[Settings, Depends(_settings)]
StatsDep = Annotated[RequestStats, Depends(_stats)]
RequestIdDep = Annotated[str, Depends(request_id)]
