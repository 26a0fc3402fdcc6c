"""RFM segments: high value, potential, new, at risk, dormant.

The rules are checked in order; the first that holds names the segment. Thresholds come from
``SegmentConfig`` so a business can move them without touching code.
"""

from __future__ import annotations

from engage.config import SegmentConfig

SEGMENTS = ("high_value", "potential", "new", "at_risk", "dormant")


def segment_sql(cfg: SegmentConfig) -> str:
    """A SQL CASE expression over the snapshot's RFM columns.

    Expects columns ``tenure_days``, ``days_since_last_purchase`` (null = never), ``orders_365d``
    and ``spend_percentile_365d`` in scope.
    """
    return f"""CASE
        WHEN tenure_days < {cfg.new_max_tenure_days} THEN 'new'
        WHEN days_since_last_purchase < {cfg.high_value_max_recency_days}
             AND orders_365d >= {cfg.high_value_min_orders_365d}
             AND spend_percentile_365d >= {cfg.high_value_spend_quantile} THEN 'high_value'
        WHEN coalesce(days_since_last_purchase, tenure_days) >= {cfg.dormant_min_recency_days} THEN 'dormant'
        WHEN days_since_last_purchase >= {cfg.at_risk_min_recency_days} AND orders_365d >= 2 THEN 'at_risk'
        ELSE 'potential'
    END"""


def segment_of(
    cfg: SegmentConfig,
    *,
    tenure_days: float,
    days_since_last_purchase: float | None,
    orders_365d: int,
    spend_percentile_365d: float,
) -> str:
    """The same rules as :func:`segment_sql`, for one customer in Python (cold start, tests)."""
    if tenure_days < cfg.new_max_tenure_days:
        return "new"
    recency = days_since_last_purchase
    if (
        recency is not None
        and recency < cfg.high_value_max_recency_days
        and orders_365d >= cfg.high_value_min_orders_365d
        and spend_percentile_365d >= cfg.high_value_spend_quantile
    ):
        return "high_value"
    if (recency if recency is not None else tenure_days) >= cfg.dormant_min_recency_days:
        return "dormant"
    if recency is not None and recency >= cfg.at_risk_min_recency_days and orders_365d >= 2:
        return "at_risk"
    return "potential"
