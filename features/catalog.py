"""The behavioural feature catalog: names, types and which Feast feature view holds each.

The DuckDB snapshot SQL (``snapshots.py``) and the Feast definitions (``feature_repo/``) are both
generated from these lists, so a feature cannot exist in one and be missing from the other.

Names come in two forms. *Feature names* are what Feast stores and serves (a list feature such as
``email_hour_shares`` is one field). *Model columns* are what the models read: each list feature spread
into its element columns (``email_hour_00`` ... ``email_hour_23``). :func:`model_columns` and
:func:`stored_features` convert between them; ``features/list_features.py`` spreads the values.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

DType = Literal["int", "float", "bool", "string", "int_list", "float_list"]

WINDOWS = (7, 30, 90)  # engagement windows, days
MONEY_WINDOWS = (30, 90, 365)  # RFM windows, days
# Engagement metric -> SQL predicate over an event row.
ENGAGEMENT_METRICS: dict[str, str] = {
    "sessions": "event_type = 'session'",
    "page_views": "event_type = 'page_view'",
    "email_opens": "event_type = 'email_open'",
    "email_clicks": "event_type = 'email_click'",
    "push_opens": "event_type = 'push_open'",
    "sms_clicks": "event_type = 'sms_click'",
}
# Message channels with a local hour-of-day profile -> the events that show engagement on them.
HOUR_PROFILE_CHANNELS: dict[str, str] = {
    "email": "event_type IN ('email_open', 'email_click')",
    "sms": "event_type = 'sms_click'",
    "push": "event_type = 'push_open'",
    "in_app": "event_type IN ('session', 'page_view') AND channel = 'in_app'",
}
OFFER_KINDS = ("discount", "free_shipping", "points", "content", "other")
CONSENT_CHANNELS = ("email", "sms", "push")


@dataclass(frozen=True)
class Feature:
    """One feature of a view. A list feature (``int_list``, ``float_list``) is one Feast field (one value in
    the online store) that models read as ``len(elements)`` columns: position ``k`` is column ``elements[k]``."""

    name: str
    dtype: DType
    view: str
    doc: str = ""
    elements: tuple[str, ...] = ()


def _rfm() -> list[Feature]:
    v = "customer_rfm"
    out = [
        Feature("tenure_days", "float", v, "days since signup"),
        Feature("days_since_last_purchase", "float", v, "null if never purchased"),
        Feature("days_since_first_purchase", "float", v, "null if never purchased"),
        Feature("orders_lifetime", "int", v),
        Feature("revenue_lifetime", "float", v),
    ]
    for w in MONEY_WINDOWS:
        out.append(Feature(f"orders_{w}d", "int", v))
        out.append(Feature(f"revenue_{w}d", "float", v))
    out += [
        Feature("avg_order_value_365d", "float", v, "null without orders in the year"),
        Feature("orders_per_30d_365d", "float", v, "orders in the last year per 30 days of observed history"),
        Feature("orders_decayed_60d", "float", v, "orders weighted by exp(-age / 60 days)"),
        Feature("purchase_gap_ratio", "float", v,
                "days since the last purchase x orders per day in the last year: expected orders missed"),
        Feature("spend_percentile_365d", "float", v, "rank of last-year spend among customers at T, 0-1"),
        Feature("segment", "string", v, "RFM segment: high_value, potential, new, at_risk, dormant"),
    ]
    return out


def _engagement() -> list[Feature]:
    v = "customer_engagement"
    out = []
    for metric in ENGAGEMENT_METRICS:
        out += [Feature(f"{metric}_{w}d", "int", v) for w in WINDOWS]
        out.append(Feature(f"{metric}_trend", "float", v, "(last 30d - prior 60d/2) / (prior 60d/2 + 1)"))
    out += [
        Feature("days_since_last_activity", "float", v, "any event; null if none"),
        Feature("active_days_30d", "int", v, "distinct days with any event"),
        Feature("history_days", "float", v, "days since the customer's first event (observed history); null if none"),
        Feature("days_since_last_session", "float", v, "null if none"),
        Feature("sessions_per_30d_365d", "float", v, "sessions in the last year per 30 days of observed history"),
        Feature("sessions_decayed_30d", "float", v, "sessions weighted by exp(-age / 30 days)"),
        Feature("session_gap_ratio", "float", v,
                "days since the last session x sessions per day in the last year: expected sessions missed"),
        Feature("sessions_30d_vs_365d", "float", v,
                "sessions per day in the last 30 days / in the last year (observed); null without sessions"),
    ]
    return out


def _support() -> list[Feature]:
    v = "customer_support"
    out = []
    for kind in ("tickets", "complaints"):
        out += [Feature(f"{kind}_{w}d", "int", v) for w in (30, 90, 365)]
        out.append(Feature(f"days_since_last_{kind[:-1]}", "float", v, "null if none"))
    out.append(Feature("days_since_last_support_contact", "float", v,
                       "ticket or complaint outside the marketing channels (email, sms, push); null if none"))
    out += [Feature(f"{ch}_consent", "bool", v, "opted in and not unsubscribed") for ch in CONSENT_CHANNELS]
    out += [
        Feature("unsubscribes_30d", "int", v),
        Feature("days_since_unsubscribe", "float", v, "null if never"),
    ]
    return out


def _offer_history() -> list[Feature]:
    v = "customer_offer_history"
    out = [
        Feature("messages_30d", "int", v),
        Feature("messages_90d", "int", v),
        Feature("messages_365d", "int", v),
        Feature("control_messages_365d", "int", v, "messages without an offer"),
        Feature("message_open_rate_365d", "float", v, "opened before T / sent; null if none sent"),
        Feature("days_since_last_message", "float", v, "null if never messaged"),
        Feature("redemptions_365d", "int", v),
        Feature("redemption_share_365d", "float", v,
                "share of the last year's orders with an offer or code; null without orders"),
        Feature("control_sends_matured_365d", "int", v,
                "messages without an offer sent 1-365 days before T (their conversion is known)"),
        Feature("control_conversions_365d", "int", v, "of those, converted"),
        Feature("offer_sends_matured_365d", "int", v, "messages with an offer sent 1-365 days before T"),
        Feature("offer_conversions_365d", "int", v, "of those, converted"),
        Feature("offer_uplift_365d", "float", v,
                "(offer conversions + 0.1) / (offer sends + 1) - (control conversions + 0.1) / (control sends + 1)"),
    ]
    for kind in OFFER_KINDS:
        out.append(Feature(f"offers_{kind}_sent_365d", "int", v))
        out.append(Feature(f"offers_{kind}_redeemed_365d", "int", v))
    return out


def _hour_profile() -> list[Feature]:
    """Per channel: engagement count, and three 24-hour vectors (one online field each instead of 24)."""
    v = "customer_hour_profile"
    out = []
    for ch in HOUR_PROFILE_CHANNELS:
        out.append(Feature(f"{ch}_engagements_365d", "int", v))
        out.append(Feature(f"{ch}_hour_shares", "float_list", v,
                           f"share of {ch} engagement at each local hour 0-23",
                           tuple(f"{ch}_hour_{h:02d}" for h in range(24))))
    for ch in HOUR_PROFILE_CHANNELS:  # the campaign log: every send is a trial at a known local hour
        out.append(Feature(f"{ch}_sent_by_hour", "int_list", v,
                           f"{ch} messages sent at each local hour 0-23, 1-365 days before T (outcome known)",
                           tuple(f"{ch}_sent_hour_{h:02d}" for h in range(24))))
        out.append(Feature(f"{ch}_opened_by_hour", "int_list", v,
                           f"of the {ch} messages sent at each local hour, those opened within 24 h (before T)",
                           tuple(f"{ch}_opened_hour_{h:02d}" for h in range(24))))
    return out


def _profile() -> list[Feature]:
    v = "customer_profile"
    return [
        Feature("timezone", "string", v),
        Feature("utc_offset_hours", "float", v, "the customer's UTC offset at T"),
        Feature("country", "string", v),
    ]


VIEWS: dict[str, list[Feature]] = {
    "customer_rfm": _rfm(),
    "customer_engagement": _engagement(),
    "customer_support": _support(),
    "customer_offer_history": _offer_history(),
    "customer_hour_profile": _hour_profile(),
    "customer_profile": _profile(),
}
PROFILE_ATTRIBUTE_PREFIX = "attr_"

# One feature service per model: which views it reads.
FEATURE_SERVICES: dict[str, tuple[str, ...]] = {
    "churn": (
        "customer_rfm", "customer_engagement", "customer_support", "customer_offer_history", "customer_profile",
    ),
    "next_best_offer": (
        "customer_rfm", "customer_engagement", "customer_support", "customer_offer_history", "customer_profile",
    ),
    "send_time": ("customer_hour_profile", "customer_engagement", "customer_support", "customer_profile"),
}


def profile_features(profile_columns: dict[str, str]) -> list[Feature]:
    """Features for the contract's extra customer columns (``{name: 'numeric'|'categorical'}``)."""
    return [
        Feature(
            PROFILE_ATTRIBUTE_PREFIX + name,
            "float" if kind == "numeric" else "string",
            "customer_profile",
            "static profile attribute from the customers file",
        )
        for name, kind in sorted(profile_columns.items())
    ]


def all_views(profile_columns: dict[str, str] | None = None) -> dict[str, list[Feature]]:
    """The views with the profile view extended by this warehouse's extra customer columns."""
    views = {name: list(feats) for name, feats in VIEWS.items()}
    views["customer_profile"] += profile_features(profile_columns or {})
    return views


def service_features(service: str, profile_columns: dict[str, str] | None = None) -> list[str]:
    """The feature names one feature service returns, in order."""
    if service not in FEATURE_SERVICES:
        raise KeyError(f"unknown feature service '{service}' (one of {', '.join(FEATURE_SERVICES)})")
    views = all_views(profile_columns)
    return [f.name for v in FEATURE_SERVICES[service] for f in views[v]]


# List feature -> its element columns, and element column -> its list feature.
LIST_FEATURES: dict[str, tuple[str, ...]] = {f.name: f.elements for fs in VIEWS.values() for f in fs if f.elements}
INT_LISTS = frozenset(f.name for fs in VIEWS.values() for f in fs if f.dtype == "int_list")
_LIST_OF: dict[str, str] = {e: name for name, elements in LIST_FEATURES.items() for e in elements}


def model_columns(features: Iterable[str]) -> list[str]:
    """Feature names as the models read them: each list feature replaced by its element columns."""
    return [col for f in features for col in LIST_FEATURES.get(f, (f,))]


def stored_features(columns: Iterable[str]) -> list[str]:
    """Model columns -> the features that hold them (a list feature once, where its first element was)."""
    return list(dict.fromkeys(_LIST_OF.get(c, c) for c in columns))
