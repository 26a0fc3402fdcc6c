"""The FastAPI app: ``create_app(settings)`` with a lifespan that loads models and flushes the log on exit.

Run it with ``engage serve`` (uvicorn). Every ``/v1`` endpoint needs ``Authorization: Bearer <key>``;
``/healthz``, ``/readyz`` and ``/metrics`` do not. Errors are JSON ``{"error", "detail"}`` without stack
traces; a request body that does not validate is a 422 naming the field and the reason.
"""

from __future__ import annotations

import gc
import logging
import sys
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.deps import require_api_key
from serving.metrics import Metrics, MetricsMiddleware
from serving.routes import feedback, health, models, recommendations
from serving.service import EngageService
from serving.settings import ServingSettings

log = logging.getLogger(__name__)
API_VERSION = "1.0"


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def create_app(settings: ServingSettings, service: EngageService | None = None) -> FastAPI:
    """The app for ``settings``; ``service`` may be passed in (tests), else it is built at start-up."""
    metrics = service.metrics if service else Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc = service or EngageService(settings, metrics)
        app.state.service = svc
        svc.start()
        # Everything loaded at start-up (models, Feast objects) lives as long as the process: move it out of
        # the collector's generations, so a full collection never pauses a request to walk it.
        gc.collect()
        gc.freeze()
        # A request arriving while a background thread (the decision log's flush: a few ms of Python per
        # batch) holds the GIL waits for the thread's switch interval before it runs; Python's default of
        # 5 ms put that wait straight into the answer's tail. With ``gil_switch_ms`` the wait is at most that.
        switch = sys.getswitchinterval()
        sys.setswitchinterval(settings.gil_switch_ms / 1000)
        ok, why = svc.ready()
        log.info("engage serving %s: %s", "ready" if ok else "NOT ready", why)
        try:
            yield
        finally:
            sys.setswitchinterval(switch)
            svc.close()

    app = FastAPI(
        title="Engage scoring API", version=API_VERSION, lifespan=lifespan,
        description="Next best action per customer: churn risk, ranked offers by uplift, channel and send time, "
                    "under the decision policy. Every /v1 endpoint needs `Authorization: Bearer <API key>`.",
    )
    app.state.api_keys = [k.encode() for k in settings.api_keys]
    auth = [Depends(require_api_key)]
    app.include_router(recommendations.router, dependencies=auth)
    app.include_router(feedback.router, dependencies=auth)
    app.include_router(models.router, dependencies=auth)
    app.include_router(health.router)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [{"field": _field(tuple(e.get("loc", ()))), "reason": e.get("msg", "invalid")} for e in exc.errors()]
        return JSONResponse({"error": "invalid_request", "detail": detail}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": _ERROR_NAMES.get(exc.status_code, "error"), "detail": exc.detail},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"error": "internal_error", "detail": "the request failed; see the service log"},
                            status_code=500)

    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


_ERROR_NAMES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                409: "conflict", 413: "too_large", 422: "invalid_request", 503: "not_ready"}


def app_from_env() -> FastAPI:
    """Factory for uvicorn (``engage serve``): settings from ``ENGAGE_*`` variables."""
    return create_app(ServingSettings.from_env())
