"""POST /v1/feedback: outcomes of what was sent, stored durably before it is acknowledged."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status
from fastapi.concurrency import run_in_threadpool

from serving.deps import ServiceDep
from serving.feedback import FeedbackConflict, FeedbackInvalid, StoreUnavailable, UnknownExposure
from serving.schemas import ErrorOut, FeedbackAck, FeedbackIn

router = APIRouter(prefix="/v1/feedback", tags=["feedback"])


@router.post("", response_model=FeedbackAck, responses={
    401: {"model": ErrorOut}, 404: {"model": ErrorOut}, 409: {"model": ErrorOut}, 422: {"model": ErrorOut},
    503: {"model": ErrorOut}})
async def feedback(body: FeedbackIn, service: ServiceDep) -> FeedbackAck:
    """Record what happened to a recommended message; idempotent by exposure_id."""
    try:
        result = await run_in_threadpool(service.record_feedback, body)
    except UnknownExposure as exc:
        service.metrics.feedback.labels("unknown_exposure").inc()
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"exposure_id: {exc}") from exc
    except FeedbackConflict as exc:
        service.metrics.feedback.labels("conflict").inc()
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    except FeedbackInvalid as exc:
        service.metrics.feedback.labels("invalid").inc()
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
    except StoreUnavailable as exc:
        service.metrics.feedback.labels("unavailable").inc()
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            "feedback could not be stored; nothing was recorded, retry later") from exc
    service.metrics.feedback.labels("duplicate" if result.duplicate else "stored").inc()
    return FeedbackAck(exposure_id=body.exposure_id, stored=result.stored, duplicate=result.duplicate)
