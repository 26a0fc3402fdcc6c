"""Labels the models learn from, as the data contract defines them, computed in DuckDB.

- churn at T with horizon H: the customer signed up before T and has no purchase (or, with
  ``on="activity"``, no event at all) in (T, T+H];
- offer response: an exposure's ``converted`` and ``revenue``, with the control arm (no offer) kept;
- send time: whether an exposure was opened within 24 hours of ``sent_at``, with its local send hour.

Labels look after T by design; the features they are paired with look strictly before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Literal

import duckdb
import pandas as pd

from features.snapshots import SnapshotError, to_utc

ChurnOn = Literal["purchase", "activity"]


def _naive(ts: datetime) -> datetime:
    return to_utc(ts).replace(tzinfo=None)


def last_event_at(con: duckdb.DuckDBPyConnection) -> datetime:
    (last,) = con.execute("SELECT max(event_at) FROM events").fetchall()[0]
    if last is None:
        raise SnapshotError("no events are loaded: run `engage ingest DIR` first")
    return to_utc(last)


def churn_labels(
    con: duckdb.DuckDBPyConnection,
    times: Sequence[datetime],
    horizon_days: int = 90,
    on: ChurnOn = "purchase",
    cutoff: datetime | None = None,
) -> pd.DataFrame:
    """One row per (customer signed up before T, T): ``customer_id, event_timestamp, churned``.

    Only times whose horizon ends inside the data are allowed (the label would be unknown otherwise):
    before ``cutoff`` when given (nothing at or after it is read), else at the last loaded event.
    """
    if horizon_days < 1:
        raise ValueError("horizon_days must be at least 1")
    if on not in ("purchase", "activity"):
        raise ValueError(f"churn label on '{on}' is not one of purchase, activity")
    end = last_event_at(con) if cutoff is None else min(last_event_at(con), to_utc(cutoff))
    late = [t for t in times if to_utc(t) + timedelta(days=horizon_days) > end]
    if late:
        raise SnapshotError(
            f"snapshot {to_utc(late[0]):%Y-%m-%d} + {horizon_days} days is after the last event "
            f"({end:%Y-%m-%d}): its churn label is not known yet"
        )
    if not times:
        return pd.DataFrame({"customer_id": [], "event_timestamp": [], "churned": []})
    which = "event_type = 'purchase'" if on == "purchase" else "true"
    frame = pd.DataFrame({"t": [_naive(t) for t in times]})
    con.register("_label_times", frame)
    try:
        df = con.execute(
            f"""
            WITH pairs AS (
                SELECT c.customer_id, t.t FROM customers c JOIN _label_times t ON c.signup_at < t.t
            ),
            hits AS (
                SELECT p.customer_id, p.t, count(e.event_id) AS n
                FROM pairs p
                LEFT JOIN events e
                  ON e.customer_id = p.customer_id AND {which}
                 AND e.event_at > p.t AND e.event_at <= p.t + INTERVAL {int(horizon_days)} DAY
                GROUP BY p.customer_id, p.t
            )
            SELECT customer_id, t AS event_timestamp, n = 0 AS churned FROM hits ORDER BY t, customer_id
            """
        ).df()
    finally:
        con.unregister("_label_times")
    df["event_timestamp"] = pd.to_datetime(df["event_timestamp"]).dt.tz_localize("UTC")
    return df


def exposure_labels(con: duckdb.DuckDBPyConnection, since: datetime | None = None,
                    until: datetime | None = None) -> pd.DataFrame:
    """Exposures with their outcomes and local send hour, sent in [since, until).

    Columns: ``exposure_id, customer_id, event_timestamp`` (= sent_at, UTC), ``channel, offer_id,
    propensity, converted, revenue, opened_24h, local_hour, local_dow``.
    """
    clauses = []
    if since is not None:
        clauses.append(f"x.sent_at >= TIMESTAMP '{_naive(since)}'")
    if until is not None:
        clauses.append(f"x.sent_at < TIMESTAMP '{_naive(until)}'")
    where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
    con.execute("SET TimeZone = 'UTC'")
    df = con.execute(
        f"""
        SELECT x.exposure_id, x.customer_id, x.sent_at AS event_timestamp, x.channel, x.offer_id,
               x.propensity, coalesce(x.converted, false) AS converted, coalesce(x.revenue, 0) AS revenue,
               coalesce(x.opened_at >= x.sent_at AND x.opened_at < x.sent_at + INTERVAL 24 HOUR, false)
                   AS opened_24h,
               hour(timezone(c.timezone, x.sent_at::TIMESTAMPTZ)) AS local_hour,
               isodow(timezone(c.timezone, x.sent_at::TIMESTAMPTZ)) - 1 AS local_dow
        FROM exposures x JOIN customers c USING (customer_id)
        {where}
        ORDER BY x.sent_at, x.exposure_id
        """
    ).df()
    df["event_timestamp"] = pd.to_datetime(df["event_timestamp"]).dt.tz_localize("UTC")
    return df
