"""create_app: the single assembly point. The lifespan starts and stops the model manager."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from loguru import logger

from . import __version__
from .api import admin
from .api.errors import install_error_handlers
from .api.middleware import RequestIdMiddleware, RequestStats
from .api.openai import routes as openai_routes
from .config.settings import Settings
from .core.manager import MLXModelManager


def create_app(settings: Settings, manager: MLXModelManager | None = None) -> FastAPI:
    """Build the app; tests pass a manager with scripted engines, production gets the real one."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        mgr = manager or MLXModelManager(settings)
        app.state.manager = mgr
        models = mgr.registry.scan()
        if models:
            logger.info("{} model(s) available: {}", len(models), ", ".join(sorted(models)))
        else:
            logger.warning(
                "no models found in {}: copy an MLX model folder there, or run "
                "`python helper_tools/tiny_models.py --model-dir {}` for a tiny demo model",
                settings.model_directory,
                settings.model_directory,
            )
        await mgr.start()
        try:
            yield
        finally:
            await mgr.stop()

    app = FastAPI(title="mlx-router", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.stats = RequestStats()
    install_error_handlers(app)
    app.include_router(openai_routes.router)
    app.include_router(admin.router)
    if settings.server.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(settings.server.cors_origins), allow_methods=["*"], allow_headers=["*"]
        )
    app.add_middleware(RequestIdMiddleware, stats=app.state.stats)
    return app
