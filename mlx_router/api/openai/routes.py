"""OpenAI routes: parse → convert → manager → convert. No other logic lives here."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from loguru import logger

from ...config.discovery import ModelSpec, estimate_memory_bytes
from ...core.manager import MLXModelManager
from ...core.templates import detect_family
from ..deps import ManagerDep, RequestIdDep, SettingsDep
from ..sse import MEDIA_TYPES, ClientGone, frame, until_disconnect
from .convert import KNOWN_FIELDS, ChunkWriter, to_generation_request
from .schemas import ChatCompletionRequest
from .serving import RequestTimer, complete, stream_chunks

router = APIRouter(tags=["openai"])


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, manager: ManagerDep, settings: SettingsDep, rid: RequestIdDep
) -> Response:
    """Create a chat completion, streamed (SSE) or not, in OpenAI's wire format."""
    timer = RequestTimer(body.model)
    if body.model_extra:
        logger.debug("ignoring unknown fields: {}", sorted(set(body.model_extra) - KNOWN_FIELDS))
    spec = await manager.resolve(body.model)
    timer.model = spec.id
    greq = to_generation_request(
        body, request_id=rid, model_id=spec.id, defaults=settings.defaults, model_cfg=manager.registry.config_for(spec)
    )
    completion_id = f"chatcmpl-{secrets.token_hex(12)}"
    stream = body.stream if body.stream is not None else settings.defaults.stream
    try:
        generation = await until_disconnect(request, manager.start_generation(greq, spec))
        if not stream:
            result = await until_disconnect(
                request, complete(generation, completion_id, spec.id, greq.sampling.logprobs, timer)
            )
            return JSONResponse(result)
    except ClientGone:
        logger.info("client disconnected; generation cancelled")
        return Response(status_code=499)
    writer = ChunkWriter(completion_id, spec.id, greq.sampling.logprobs)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    chunks = stream_chunks(
        generation, writer, timer, include_usage=include_usage, chunk_size=settings.defaults.stream_chunk_size
    )
    fmt = settings.defaults.streaming_format
    return StreamingResponse(frame(chunks, fmt), media_type=MEDIA_TYPES[fmt], headers={"Cache-Control": "no-cache"})


@router.get("/v1/models")
async def list_models(manager: ManagerDep, settings: SettingsDep) -> dict[str, Any]:
    """Every model found in the model directory, with its context window, memory estimate and load state."""
    specs, created = await asyncio.to_thread(_specs_with_mtimes, manager)
    states = {s.id: s.state.value for s in manager.snapshot()}
    margin = settings.defaults.safety_margin
    data = [
        {
            "id": spec.id,
            "object": "model",
            "created": created[spec.id],
            "owned_by": "mlx-router",
            "context_window": spec.context_window,
            "estimated_memory_gb": round(
                estimate_memory_bytes(spec, manager.registry.config_for(spec), margin) / 1024**3, 3
            ),
            "loaded": states.get(spec.id) == "ready",
            "state": states.get(spec.id, "unloaded"),
            "aliases": list(spec.aliases),
            "model_type": spec.model_type,
            "family": _family(manager, spec),
        }
        for spec in specs
    ]
    return {"object": "list", "data": data}


def _family(manager: MLXModelManager, spec: ModelSpec) -> str:
    """Configured, else what the loaded engine detected, else a guess from config.json alone."""
    cfg = manager.registry.config_for(spec)
    if cfg and (cfg.family or cfg.chat_template):
        return str(cfg.family or cfg.chat_template)
    engine = manager.engine_of(spec.id)
    family = getattr(engine, "family", None)
    return str(family) if family else detect_family(spec.config, None)


def _specs_with_mtimes(manager: MLXModelManager) -> tuple[list[ModelSpec], dict[str, int]]:
    """Blocking disk work for the model list, run in a worker thread."""
    specs = manager.registry.list()
    return specs, {s.id: int(s.path.stat().st_mtime) if s.path.exists() else 0 for s in specs}
