"""The decision policy: the business rules ``serving/decide.py`` applies on top of the model scores.

YAML, expanded with environment variables, validated by pydantic (unknown keys are an error). Resolution:
``$ENGAGE_POLICY`` > ``$ENGAGE_HOME/policy.yaml`` if it exists > the packaged ``serving/default_policy.yaml``.
"""

from __future__ import annotations

import hashlib
import os
import re
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from engage.config import read_yaml
from engage.settings import resolve_home
from features.segments import SEGMENTS

DEFAULT_POLICY_FILE = Path(__file__).with_name("default_policy.yaml")

Action = Literal["winback", "retain", "upsell", "nurture"]
Channel = Literal["email", "sms", "push", "in_app"]
Tier = Literal["high", "medium", "low", "unknown"]
_HOUR = re.compile(r"^([01]?\d|2[0-3]):00$")


class PolicyError(ValueError):
    """The policy file is unreadable or invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_segments(names: Any) -> Any:
    unknown = sorted(set(names) - set(SEGMENTS)) if names else []
    if unknown:
        raise ValueError(f"unknown segment(s) {', '.join(unknown)}; segments are {', '.join(SEGMENTS)}")
    return names


class RiskTiers(_Strict):
    """Churn-probability thresholds of the risk tiers (``unknown`` when there is no churn score)."""

    high: float = Field(0.6, ge=0, le=1, description="Churn probability at or above this is `high` risk.")
    medium: float = Field(0.3, ge=0, le=1, description="At or above this (and below `high`) is `medium` risk.")

    @model_validator(mode="after")
    def _ordered(self) -> RiskTiers:
        if self.medium >= self.high:
            raise ValueError(f"risk_tiers.medium ({self.medium}) must be below risk_tiers.high ({self.high})")
        return self

    def tier(self, p: float | None) -> str:
        """The tier of a churn probability."""
        if p is None:
            return "unknown"
        return "high" if p >= self.high else "medium" if p >= self.medium else "low"


class TierActions(_Strict):
    """The action of each risk tier."""

    high: Action = Field("retain", description="Action for `high` churn risk.")
    medium: Action = Field("retain", description="Action for `medium` churn risk.")
    low: Action = Field("upsell", description="Action for `low` churn risk.")
    unknown: Action = Field("nurture", description="Action without a churn score (no model, cold start).")


class ActionRules(_Strict):
    """Which action each risk tier gets; ``upsell`` becomes ``nurture`` when no offer is profitable."""

    by_tier: TierActions = Field(TierActions(), description="Action per risk tier.")
    by_tier_segment: dict[Tier, dict[str, Action]] = Field(
        default_factory=lambda: {"high": {"dormant": "winback", "at_risk": "winback"}},
        description="Overrides of `by_tier` for some segments of a tier.",
    )
    without_offer: list[Action] = Field(["nurture"], description="Actions that never carry an offer.")

    @field_validator("by_tier_segment")
    @classmethod
    def _known_segments(cls, value: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        for per_segment in value.values():
            _check_segments(per_segment)
        return value

    def action_for(self, tier: str, segment: str) -> str:
        """The configured action of a tier and segment."""
        override = self.by_tier_segment.get(tier)  # type: ignore[call-overload]
        if override and segment in override:
            return override[segment]
        return getattr(self.by_tier, tier)


class ChannelRule(_Strict):
    """One channel the business sends on."""

    weight: float = Field(1.0, ge=0, description="Multiplies the expected open rate when channels compete.")
    requires_consent: bool = Field(True, description="Send only with consent True (consent False always blocks).")


class SuppressionRules(_Strict):
    """Events that stop every message for a while."""

    complaint_days: float = Field(30, ge=0, description="No message within this many days of a complaint.")
    unsubscribe_days: float = Field(30, ge=0, description="No message within this many days of an unsubscribe.")


class ContactCap(_Strict):
    """At most ``max_messages`` messages in any ``per_days`` days."""

    max_messages: int = Field(1, ge=1, description="Messages allowed in the window.")
    per_days: float = Field(7, gt=0, description="Length of the sliding window in days.")


class ContactCaps(_Strict):
    """Frequency caps: one default, overridden per segment."""

    default: ContactCap = Field(ContactCap(), description="Cap of a segment not listed in `segments`.")
    segments: dict[str, ContactCap] = Field(
        default_factory=lambda: {"high_value": ContactCap(max_messages=1, per_days=14)},
        description="Caps per RFM segment.",
    )

    @field_validator("segments")
    @classmethod
    def _known_segments(cls, value: dict[str, ContactCap]) -> dict[str, ContactCap]:
        return _check_segments(value)

    def for_segment(self, segment: str) -> ContactCap:
        """The cap that applies to a segment."""
        return self.segments.get(segment, self.default)

    @property
    def longest_days(self) -> float:
        """The longest window any cap counts messages over: an older send counts against no cap."""
        return max(c.per_days for c in (self.default, *self.segments.values()))


class QuietHours(_Strict):
    """Local hours with no sends, from ``start`` up to ``end`` (wrapping midnight when start > end)."""

    start: int = Field(21, description="First quiet local hour, 'HH:00' (or an hour 0-23).")
    end: int = Field(8, description="First local hour after the quiet hours, 'HH:00' (or an hour 0-23).")

    @field_validator("start", "end", mode="before")
    @classmethod
    def _whole_hour(cls, value: Any) -> int:
        if isinstance(value, str) and _HOUR.match(value.strip()):
            return int(value.strip().split(":")[0])
        # Unquoted HH:00 reads as a base-60 integer in YAML 1.1 (21:00 -> 1260).
        if isinstance(value, int) and not isinstance(value, bool):
            if 0 <= value <= 23:
                return value
            if value % 60 == 0 and 0 <= value < 24 * 60:
                return value // 60
        raise ValueError(f"must be a whole local hour as 'HH:00' (00:00-23:00) or 0-23, got {value!r}")

    @model_validator(mode="after")
    def _not_empty(self) -> QuietHours:
        if self.start == self.end:
            raise ValueError("quiet_hours.start and quiet_hours.end are equal; use `quiet_hours: null` for none")
        return self

    def is_quiet(self, hour: int) -> bool:
        """Whether a local hour is inside the quiet hours."""
        if self.start < self.end:
            return self.start <= hour < self.end
        return hour >= self.start or hour < self.end


class SendTimeRules(_Strict):
    """Send-hour choice when the send-time model gives no curve."""

    default_local_hour: int = Field(10, ge=0, le=23, description="Local hour used on a channel without a curve.")


class ContextWeights(_Strict):
    """Priority weight per action: scales every offer's priority for customers in that action."""

    winback: float = Field(1.2, ge=0, description="Weight of offers to customers being won back.")
    retain: float = Field(1.1, ge=0, description="Weight of offers to customers being retained.")
    upsell: float = Field(1.0, ge=0, description="Weight of offers to low-risk customers.")
    nurture: float = Field(1.0, ge=0, description="Weight for nurture (which carries no offer by default).")


class Arbitration(_Strict):
    """Priority = P(respond) x value x context weight x business lever."""

    context_weights: ContextWeights = Field(ContextWeights(), description="Weight per action.")


class OfferRule(_Strict):
    """Business settings of one offer; in `offers`, fields not given come from `offer_defaults`."""

    enabled: bool = Field(True, description="False removes the offer.")
    segments: list[str] = Field(default_factory=list, description="Segments it may go to (empty = all).")
    channels: list[Channel] = Field(default_factory=list, description="Channels it may go on (empty = all).")
    lever: float = Field(1.0, ge=0, description="Priority multiplier: 0 holds the offer, above 1 pushes it.")

    @field_validator("segments")
    @classmethod
    def _known_segments(cls, value: list[str]) -> list[str]:
        return _check_segments(value)


class Exploration(_Strict):
    """Epsilon-greedy exploration over the best offers, so later models can learn off-policy."""

    epsilon: float = Field(0.05, ge=0, le=1, description="Share of decisions drawn uniformly from the top_k.")
    top_k: int = Field(3, ge=1, description="Explore among this many best positive-priority offers.")


class Holdout(_Strict):
    """The control group: customers who get ``action: none`` (reason ``holdout``) so results can be measured."""

    share: float = Field(0.05, ge=0, le=0.5, description="Share of customers in the control group, 0 to 0.5.")
    salt: str = Field("engage-holdout-v1", min_length=1,
                      description="Changing it draws a new control group; keep it for the life of an experiment.")

    def contains(self, customer_id: str) -> bool:
        """Whether ``customer_id`` is in the control group: a salted hash, stable across runs and processes."""
        if self.share <= 0:
            return False
        digest = hashlib.blake2b(f"{self.salt}\x1f{customer_id}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64 < self.share


class Policy(_Strict):
    """Every rule the decision applies; see ``serving/default_policy.yaml``."""

    risk_tiers: RiskTiers = RiskTiers()
    actions: ActionRules = ActionRules()
    channels: dict[Channel, ChannelRule] = Field(
        default_factory=lambda: {
            "email": ChannelRule(weight=1.0),
            "sms": ChannelRule(weight=0.8),
            "push": ChannelRule(weight=0.9),
            "in_app": ChannelRule(weight=0.7, requires_consent=False),
        },
        description="Channels the business sends on, with their weight and consent rule.",
    )
    suppression: SuppressionRules = SuppressionRules()
    contact_caps: ContactCaps = ContactCaps()
    quiet_hours: QuietHours | None = Field(QuietHours(), description="Null = no quiet hours.")
    send_time: SendTimeRules = SendTimeRules()
    arbitration: Arbitration = Arbitration()
    offer_defaults: OfferRule = Field(OfferRule(), description="Settings of an offer not listed in `offers`.")
    offers: dict[str, OfferRule] = Field(default_factory=dict, description="Settings per offer id.")
    exploration: Exploration = Exploration()
    holdout: Holdout = Holdout()

    @model_validator(mode="after")
    def _default_hour_is_open(self) -> Policy:
        hour = self.send_time.default_local_hour
        if self.quiet_hours is not None and self.quiet_hours.is_quiet(hour):
            raise ValueError(f"send_time.default_local_hour ({hour}) is inside quiet_hours")
        return self

    # Derived once per policy (cached_property writes to the instance dict, which a frozen model allows).
    @cached_property
    def open_hours(self) -> tuple[bool, ...]:
        """Per local hour 0-23, whether it is outside the quiet hours."""
        quiet = self.quiet_hours
        return tuple(quiet is None or not quiet.is_quiet(h) for h in range(24))

    @cached_property
    def open_hour_list(self) -> tuple[int, ...]:
        """The local hours outside the quiet hours, ascending."""
        return tuple(h for h in range(24) if self.open_hours[h])

    @cached_property
    def _offer_cache(self) -> dict[str, tuple[OfferRule, frozenset[str], frozenset[str]]]:
        return {}

    def offer_rule(self, offer_id: str) -> tuple[OfferRule, frozenset[str], frozenset[str]]:
        """The effective rule of an offer (defaults merged), with its segments and channels as sets."""
        cached = self._offer_cache.get(offer_id)
        if cached is None:
            rule = self.offer_defaults
            own = self.offers.get(offer_id)
            if own is not None:
                rule = rule.model_copy(update={k: getattr(own, k) for k in own.model_fields_set})
            cached = (rule, frozenset(rule.segments), frozenset(rule.channels))
            self._offer_cache[offer_id] = cached
        return cached


def policy_path(home: Path | None = None) -> Path:
    """``$ENGAGE_POLICY`` if set, else ``<home>/policy.yaml`` if it exists, else the packaged defaults."""
    explicit = os.environ.get("ENGAGE_POLICY")
    if explicit:
        return Path(explicit)
    local = (home or resolve_home()) / "policy.yaml"
    return local if local.exists() else DEFAULT_POLICY_FILE


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        parts.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def load_policy(path: Path | None = None) -> Policy:
    """Read and validate a policy file (resolved by :func:`policy_path` when ``path`` is None)."""
    path = Path(path) if path is not None else policy_path()
    raw = read_yaml(path, "policy", PolicyError)
    try:
        return Policy.model_validate(raw)
    except ValidationError as exc:
        raise PolicyError(f"policy {path} is invalid: {_describe(exc)}") from exc

