"""Training sets: labels joined to point-in-time features by Feast's ``get_historical_features``.

Nothing here joins features by hand: entity rows (customer, timestamp) go to Feast, which returns each
customer's latest snapshot at or before the timestamp. Snapshot files the sets need are built first.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta

import pandas as pd

from features import store as fstore
from features.labels import churn_labels, exposure_labels
from features.snapshots import (
    build_snapshots,
    data_range,
    profile_columns,
    snapshot_file,
    snapshot_times,
    to_utc,
)
from training.base import MissingExposures, TrainContext, TrainingError

log = logging.getLogger(__name__)


def churn_times(ctx: TrainContext) -> list[datetime]:
    """Weekly snapshot times whose horizon ends before the cutoff, the latest ``max_snapshots`` of them."""
    tcfg = ctx.cfg.training
    first_signup, last_event = data_range(ctx.con)
    cutoff = min(ctx.as_of, last_event)
    last_t = cutoff - timedelta(days=ctx.horizon)
    first_t = first_signup + timedelta(days=tcfg.snapshot_every_days)
    times = snapshot_times(first_t, last_t, tcfg.snapshot_every_days) if last_t > first_t else []
    times = times[-tcfg.max_snapshots :]
    if len(times) < 2:
        raise TrainingError(
            f"too little data for a holdout: a {ctx.horizon}-day churn horizon before "
            f"{cutoff:%Y-%m-%d} leaves {len(times)} snapshot time(s); need at least 2 "
            "(load more history, or lower --horizon-days)"
        )
    return times


def _stale_after(ctx: TrainContext) -> float:
    """Snapshot files older than the last load are rebuilt (the data under them changed)."""
    rows = ctx.con.execute("SELECT max(loaded_at) FROM loads").fetchall()
    last = rows[0][0] if rows else None
    return to_utc(last).timestamp() if last is not None else 0.0


def ensure_snapshots(ctx: TrainContext, times: Sequence[datetime]) -> None:
    """Build the snapshot files that are missing or older than the last load, and apply Feast if needed."""
    stale_after = _stale_after(ctx)
    todo = [
        t for t in times
        if not snapshot_file(ctx.home, t).exists() or snapshot_file(ctx.home, t).stat().st_mtime < stale_after
    ]
    if todo:
        log.info("building %d feature snapshot(s)", len(todo))
        build_snapshots(ctx.con, ctx.home, ctx.cfg.features, todo)
    if not ctx.store.list_feature_views():
        fstore.apply(ctx.store, ctx.home, profile_columns(ctx.con), ctx.cfg.features.snapshot_ttl_days)


def churn_dataset(ctx: TrainContext, times: Sequence[datetime]) -> pd.DataFrame:
    """Churn labels at each time with the ``churn`` feature service's features as of that time."""
    ensure_snapshots(ctx, times)
    labels = churn_labels(ctx.con, times, ctx.horizon, ctx.cfg.training.churn_on, cutoff=ctx.as_of)
    if labels.empty:
        raise TrainingError("no customers had signed up before the first snapshot time")
    feats = fstore.historical_features(ctx.store, "churn", labels[["customer_id", "event_timestamp"]])
    return labels.merge(feats, on=["customer_id", "event_timestamp"], how="left", validate="one_to_one")


def exposures_dataset(ctx: TrainContext, service: str) -> pd.DataFrame:
    """Sends whose 24-hour outcome is known by the cutoff, with ``service`` features as of each send."""
    cutoff = ctx.as_of - timedelta(hours=24)
    sends = exposure_labels(ctx.con, until=cutoff)
    if sends.empty:
        raise MissingExposures(
            f"{service} learns from the exposures table (the campaign log) and none is loaded before "
            f"{cutoff:%Y-%m-%d}: load exposures.csv/.parquet with `engage ingest` to train it"
        )
    every = ctx.cfg.training.snapshot_every_days
    first_signup, _ = data_range(ctx.con)
    start = max(sends["event_timestamp"].min() - timedelta(days=every), first_signup + timedelta(days=1))
    ensure_snapshots(ctx, snapshot_times(start, cutoff, every))
    feats = fstore.historical_features(
        ctx.store, service, sends[["exposure_id", "customer_id", "event_timestamp"]]
    )
    feats = feats.drop(columns=["customer_id", "event_timestamp"])
    return sends.merge(feats, on="exposure_id", how="left", validate="one_to_one")


def split_by_time(df: pd.DataFrame, holdout_share: float, min_rows: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train on earlier timestamps, hold out the latest ``holdout_share`` of distinct timestamps (or rows)."""
    stamps = sorted(df["event_timestamp"].unique())
    if len(stamps) >= 2 and len(stamps) <= 1000:
        n_hold = max(1, round(len(stamps) * holdout_share))
        boundary = stamps[-n_hold]
    else:  # many distinct send times: split on the time quantile
        boundary = df["event_timestamp"].quantile(1 - holdout_share)
    train, hold = df[df["event_timestamp"] < boundary], df[df["event_timestamp"] >= boundary]
    if len(train) < min_rows or len(hold) < max(10, min_rows // 10):
        raise TrainingError(
            f"too little data for a holdout: {len(train)} training and {len(hold)} holdout rows "
            f"(need at least {min_rows} and {max(10, min_rows // 10)})"
        )
    return train, hold


def describe_window(df: pd.DataFrame) -> str:
    lo, hi = to_utc(df["event_timestamp"].min()), to_utc(df["event_timestamp"].max())
    return f"{lo:%Y-%m-%d} to {hi:%Y-%m-%d}, {len(df):,} rows"
