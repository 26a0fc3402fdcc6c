"""What the models say about one customer, and what the service decides for them.

``serving/scoring.py`` turns online (or offline) features into :class:`CustomerScores` with the three
champion models; ``serving/decide.py`` turns scores, the decision policy and the moment into a
:class:`Decision`. The scoring service and batch scoring both go through these two steps, so a
customer gets the same answer from either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

CHANNELS = ("email", "sms", "push", "in_app")  # message channels a recommendation can name
ACTIONS = ("winback", "retain", "nurture", "upsell", "none")
CONTROL_ARM = "none"  # the next-best-offer model's arm for a message without an offer


@dataclass
class CustomerScores:
    """Model outputs and the policy-relevant facts of one customer.

    Times are timezone-aware UTC. ``None`` in an optional field means unknown (cold start, no model).
    """

    customer_id: str
    cold_start: bool = False  # no features for this customer: segment and global defaults
    degraded: bool = False  # the feature store could not be read: defaults
    feature_timestamp: datetime | None = None  # the snapshot time the features describe
    segment: str = "new"  # RFM segment (high_value, potential, new, at_risk, dormant)
    timezone: str = "UTC"  # IANA name
    consent: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(CHANNELS, True))
    # Contact and support history, as of the feature timestamp (the decision adds the time since).
    days_since_unsubscribe: float | None = None
    days_since_complaint: float | None = None
    days_since_last_message: float | None = None
    messages_30d: int = 0
    # Churn model
    churn_probability: float | None = None
    churn_reasons: list[str] = field(default_factory=list)
    expected_value: float = 0.0  # expected revenue over the churn horizon (value at risk = p * this)
    # Next-best-offer model: arms[0] is the control ("none"); p_convert and profit align with arms. Arrays or
    # plain lists of floats (Scorer.score converts a whole matrix to lists at once: cheaper than per customer).
    arms: list[str] = field(default_factory=list)
    p_convert: np.ndarray | list[float] | None = None  # P(convert | message with this arm)
    incremental_profit: np.ndarray | list[float] | None = None  # (p_arm - p_none) * margin * revenue - p_arm * cost
    arm_channels: list[frozenset[str]] = field(default_factory=list)  # empty set = every channel
    # Send-time model: per channel, P(open within 24 h) at each local hour 0-23, and the hours with
    # training sends (only those may be recommended).
    open_curves: dict[str, np.ndarray | list[float]] = field(default_factory=dict)
    supported_hours: dict[str, np.ndarray] = field(default_factory=dict)
    # Per channel with a curve: (best supported hour among ``best_hours_for`` or None, its open rate, best
    # supported hour of all 24), found for a whole matrix at once (batch scoring). The policy uses them when
    # its open hours are ``best_hours_for``, and works them out from ``open_curves`` otherwise.
    best_hours: dict[str, tuple[int | None, float | None, int]] = field(default_factory=dict)
    best_hours_for: tuple[int, ...] | None = None
    model_versions: dict[str, str] = field(default_factory=dict)  # model name -> registry version


@dataclass
class OfferScore:
    """One candidate offer, as returned to the caller."""

    offer_id: str
    p_convert_with: float
    p_convert_without: float
    uplift: float  # p_convert_with - p_convert_without
    expected_incremental_profit: float
    priority: float  # the arbitration score the ranking used
    eligible: bool = True
    suppressed_by: str | None = None  # the policy rule that removed it, if any


@dataclass
class ChannelScore:
    channel: str
    eligible: bool
    best_local_hour: int | None = None
    expected_open_rate: float | None = None
    suppressed_by: str | None = None


@dataclass
class Suppression:
    """A policy rule that removed something: an offer, a channel, or the whole action."""

    rule: str  # e.g. consent, recent_complaint, recent_unsubscribe, contact_cap, quiet_hours, offer_channel
    target: str  # "action", "channel:<name>" or "offer:<id>"
    detail: str  # a sentence a person can read


@dataclass
class Decision:
    """What to do for one customer now. ``action == "none"`` comes with ``reason``."""

    customer_id: str
    action: str
    reason: str | None  # why no action (rule name), or None
    churn_probability: float | None
    risk_tier: str  # low, medium, high, unknown
    segment: str
    reasons: list[str]  # churn reason codes
    offers: list[OfferScore]  # ranked, eligible first; at most max_offers
    chosen_offer: str | None  # None = a message without an offer (or no message)
    channel: str | None
    send_at: datetime | None  # UTC
    send_at_local: datetime | None  # in the customer's timezone
    expected_open_rate: float | None
    propensity: float  # probability with which the policy chose this offer (exploration included)
    channels: list[ChannelScore]
    suppressions: list[Suppression]
    cold_start: bool
    degraded: bool
    feature_timestamp: datetime | None
    model_versions: dict[str, str]
    expected_value_at_risk: float | None = None  # churn probability x expected value over the horizon
    holdout: bool = False  # in the control group (action none, reason holdout)
    intended_action: str | None = None  # for the control group: the action the policy would have taken
    # Set by the scoring service (online features): age of the oldest feature row used, in seconds at the
    # decision time; the feature views dropped as older than their limit; the models that were not loaded.
    feature_age_s: float | None = None
    stale_views: list[str] = field(default_factory=list)
    missing_models: list[str] = field(default_factory=list)
