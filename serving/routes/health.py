"""GET /healthz, /readyz and /metrics (no API key: for the orchestrator and Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Response, status
from fastapi.responses import JSONResponse

from serving.deps import ServiceDep
from serving.metrics import CONTENT_TYPE

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "not ready, with the reason"}})
async def readyz(service: ServiceDep) -> JSONResponse:
    """Models and the feature store are loaded."""
    ok, why = service.ready()
    return JSONResponse({"status": "ready" if ok else "not ready", "detail": why,
                         "models": service.models.current.versions},
                        status_code=status.HTTP_200_OK if ok else status.HTTP_503_SERVICE_UNAVAILABLE)


@router.get("/metrics")
async def metrics(service: ServiceDep) -> Response:
    """Prometheus metrics."""
    return Response(service.metrics.render(), media_type=CONTENT_TYPE)
