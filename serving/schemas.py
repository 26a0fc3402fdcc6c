"""Request and response bodies of the scoring API (one pydantic model per purpose)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Channel = Literal["email", "sms", "push", "in_app"]
CustomerId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^\S(.*\S)?$",
                                  description="the customer's id in the data contract (1-64 characters)")]
MAX_OFFERS = 10


EARLIEST, LATEST = datetime(1970, 1, 1, tzinfo=UTC), datetime(2200, 1, 1, tzinfo=UTC)


def _aware(ts: datetime | None) -> datetime | None:
    """A timestamp without an offset is UTC (as in the data contract); years 1970-2199."""
    if ts is None:
        return None
    if not (EARLIEST.replace(tzinfo=None) + timedelta(days=1) <= ts.replace(tzinfo=None)
            <= LATEST.replace(tzinfo=None) - timedelta(days=1)):
        raise ValueError("must be between 1970 and 2199")
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecommendationRequest(_Strict):
    customer_id: CustomerId
    channels: list[Channel] | None = Field(None, min_length=1, max_length=4,
                                           description="candidate channels; default: every channel the policy allows")
    now: datetime | None = Field(None, description="decision time (ISO 8601; no offset = UTC); default: server time")
    max_offers: int = Field(3, ge=0, le=MAX_OFFERS, description="how many ranked offers to return")

    @field_validator("channels")
    @classmethod
    def _unique(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError("channels must not repeat")
        return v

    @field_validator("now")
    @classmethod
    def _utc(cls, v: datetime | None) -> datetime | None:
        return _aware(v)


class BatchRequest(_Strict):
    requests: list[RecommendationRequest] = Field(min_length=1, description="one per customer; at most 1,000 (413)")


class OfferOut(BaseModel):
    offer_id: str
    p_convert_with: float = Field(description="P(convert) if sent with this offer")
    p_convert_without: float = Field(description="P(convert) if sent without an offer")
    uplift: float
    expected_incremental_profit: float
    priority: float = Field(description="arbitration score: P(respond) x value x context weight x business lever")
    eligible: bool
    suppressed_by: str | None = None


class ChannelOut(BaseModel):
    channel: str
    eligible: bool
    best_local_hour: int | None = None
    expected_open_rate: float | None = None
    suppressed_by: str | None = None


class SuppressionOut(BaseModel):
    rule: str
    target: str
    detail: str


class Recommendation(BaseModel):
    request_id: str
    exposure_id: str | None = Field(description="quote it in feedback; none when the action is none")
    customer_id: str
    action: Literal["winback", "retain", "nurture", "upsell", "none"]
    reason: str | None = Field(description="why the action is none (the policy rule), else null")
    churn_probability: float | None
    risk_tier: str
    segment: str
    reason_codes: list[str] = Field(description="features pushing churn risk up the most")
    expected_value_at_risk: float | None
    holdout: bool = Field(False, description="in the control group: action none, reason holdout")
    intended_action: str | None = Field(None, description="for the control group: the action it would have got")
    offers: list[OfferOut]
    chosen_offer: str | None
    channel: str | None
    send_at: datetime | None = Field(description="UTC: the next allowed slot at the customer's best local hour")
    send_at_local: datetime | None = Field(description="the same instant in the customer's timezone")
    expected_open_rate: float | None
    propensity: float = Field(description="probability the policy had of choosing this offer (exploration)")
    channels: list[ChannelOut]
    suppressions: list[SuppressionOut]
    cold_start: bool
    degraded: bool
    feature_timestamp: datetime | None
    feature_age_seconds: float | None = Field(
        None, description="age of the oldest online feature row the answer used, at its time (null: none used)")
    stale_features: bool = Field(
        False, description="a feature view was older than its limit and was treated as missing (see stale_views)")
    stale_views: list[str] = Field(default_factory=list, description="the feature views treated as missing")
    model_versions: dict[str, str]
    missing_models: list[str] = Field(
        default_factory=list, description="champions not loaded: without next_best_offer no offers, without "
                                          "send_time the policy's default hour")


class BatchResponse(BaseModel):
    request_id: str
    results: list[Recommendation]


class FeedbackIn(_Strict):
    exposure_id: str = Field(min_length=1, max_length=128)
    customer_id: CustomerId
    channel: Channel
    offer_id: str | None = Field(None, max_length=64, description="null = the message had no offer")
    request_id: str | None = Field(None, max_length=64)
    sent: bool
    sent_at: datetime | None = None
    opened: bool = False
    opened_at: datetime | None = None
    clicked: bool = False
    converted: bool = False
    revenue: float = Field(0.0, ge=0, le=1e9, allow_inf_nan=False)

    @field_validator("sent_at", "opened_at")
    @classmethod
    def _utc(cls, v: datetime | None) -> datetime | None:
        return _aware(v)

    @model_validator(mode="after")
    def _consistent(self) -> FeedbackIn:
        for flag in ("opened", "clicked", "converted"):
            if getattr(self, flag) and not self.sent:
                raise ValueError(f"{flag} is true but sent is false: a message that was not sent cannot be {flag}")
        if self.revenue > 0 and not self.converted:
            raise ValueError("revenue without converted: set converted true or revenue 0")
        if self.opened_at is not None and not self.opened:
            raise ValueError("opened_at given but opened is false")
        return self


class FeedbackAck(BaseModel):
    exposure_id: str
    stored: bool
    duplicate: bool = Field(description="this exposure had feedback already; merged (idempotent)")


class ModelOut(BaseModel):
    name: str
    version: str
    alias: str
    run_id: str
    trained_as_of: str
    feature_service: str
    n_features: int
    loaded_at: str


class ModelsResponse(BaseModel):
    models: list[ModelOut]
    last_check: datetime | None
    last_error: str | None


class ReloadResponse(BaseModel):
    changed: bool
    error: str | None
    versions: dict[str, str]


class ErrorOut(BaseModel):
    error: str
    detail: str | list[dict] | None = None
