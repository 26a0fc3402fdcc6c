"""POST /v1/recommendations and /v1/recommendations/batch."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, Response, status
from fastapi.concurrency import run_in_threadpool

from serving.schemas import BatchRequest, BatchResponse, ErrorOut, Recommendation, RecommendationRequest
from serving.service import EngageService, NotReady

router = APIRouter(prefix="/v1/recommendations", tags=["recommendations"])
_ERRORS = {401: {"model": ErrorOut}, 422: {"model": ErrorOut}, 503: {"model": ErrorOut}}


# The answers are the service's own Recommendation models: they go out as their JSON directly (the documented
# response_model stays), without FastAPI validating and serializing them again. The service comes from the app's
# state instead of a dependency: both are per-request costs of this, the hot endpoint.


def _json(answer: Recommendation | BatchResponse) -> Response:
    return Response(answer.model_dump_json(), media_type="application/json")


@router.post("", response_model=Recommendation, responses=_ERRORS)
async def recommend(body: RecommendationRequest, request: Request) -> Response:
    """The next best action for one customer now."""
    service: EngageService = request.app.state.service
    try:
        return _json(service.recommend([body])[0])  # a few milliseconds of CPU: cheaper inline than a thread hop
    except NotReady as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from exc


@router.post("/batch", response_model=BatchResponse, responses={**_ERRORS, 413: {"model": ErrorOut}})
async def recommend_batch(body: BatchRequest, request: Request) -> Response:
    """The next best action for up to 1,000 customers (one feature read for all)."""
    service: EngageService = request.app.state.service
    limit = service.settings.max_batch
    if len(body.requests) > limit:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE,
                            f"requests: {len(body.requests)} customers in one batch, at most {limit}")
    try:
        results = await run_in_threadpool(service.recommend, body.requests, "batch_api")
    except NotReady as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from exc
    return _json(BatchResponse(request_id=results[0].request_id, results=results))
