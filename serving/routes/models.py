"""GET /v1/models and POST /v1/admin/reload."""

from __future__ import annotations

import os

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool

from serving.deps import ServiceDep
from serving.schemas import ModelOut, ModelsResponse, ReloadResponse

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", response_model=ModelsResponse)
async def models(service: ServiceDep, response: Response) -> ModelsResponse:
    """The loaded champion models: name, version, alias, trained-at and feature service (header
    ``X-Engage-Worker``: the process that answered, as ``engage serve --workers N`` runs several)."""
    response.headers["X-Engage-Worker"] = str(os.getpid())
    current = service.models.current
    return ModelsResponse(models=[ModelOut(**m.describe()) for m in current.models.values()],
                          last_check=service.models.last_check, last_error=service.models.last_error)


@router.post("/admin/reload", response_model=ReloadResponse)
async def reload(service: ServiceDep) -> ReloadResponse:
    """Load any champion whose alias moved; a failed reload keeps the current models."""
    changed, error = await run_in_threadpool(service.models.reload)
    return ReloadResponse(changed=changed, error=error, versions=service.models.current.versions)
