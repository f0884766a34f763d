"""Health and status endpoints: cheap, and read only the manager's immutable snapshot."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from .. import __version__
from ..core.memory import system_memory
from .deps import ManagerDep, StatsDep
from .middleware import snapshot

router = APIRouter(tags=["health"])


@router.get("/health")
async def health(manager: ManagerDep) -> JSONResponse:
    """200 while the server can serve at least one model, 503 when no model is available."""
    models = await asyncio.to_thread(manager.registry.list)
    if not models:
        body = {"status": "unavailable", "reason": "no models are available: add one to the model directory"}
        return JSONResponse(body, status_code=503)
    return JSONResponse({"status": "ok", "models_available": len(models)})


@router.get("/v1/health")
async def health_details(manager: ManagerDep, stats: StatsDep) -> dict[str, Any]:
    """Uptime, request counts, resident models and memory use."""
    mem = system_memory()
    gib = 1024**3
    return {
        "status": "ok",
        "version": __version__,
        **snapshot(stats),
        "loaded_models": [
            {
                "id": s.id,
                "state": s.state.value,
                "active_requests": s.active_requests,
                "memory_gb": round(s.memory_bytes / gib, 3),
                "pinned": s.pinned,
            }
            for s in manager.snapshot()
        ],
        "memory": {
            "budget_gb": round(manager.budget_bytes / gib, 2),
            "system_total_gb": round(mem.total_bytes / gib, 2),
            "system_available_gb": round(mem.available_bytes / gib, 2),
        },
    }
