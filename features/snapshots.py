"""Point-in-time customer feature snapshots, computed with DuckDB over the loaded warehouse.

A snapshot at time T has one row per customer who signed up before T, and every value in it is
computed from rows strictly before T: events with ``event_at < T``, messages with ``sent_at < T``
and opens with ``opened_at < T`` (a message sent before T but opened after it counts as unopened).
Each snapshot is one Parquet file, written to a temporary name and renamed into place, so a failed
build never leaves a file that looks complete; Feast reads the folder as one source.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import duckdb
import pandas as pd

from engage.config import FeatureConfig
from features.catalog import (
    CONSENT_CHANNELS,
    ENGAGEMENT_METRICS,
    HOUR_PROFILE_CHANNELS,
    MONEY_WINDOWS,
    OFFER_KINDS,
    PROFILE_ATTRIBUTE_PREFIX,
    WINDOWS,
)
from features.segments import segment_sql

SNAPSHOT_DIR = Path("feature_data") / "customer_snapshots"
ENTITY = "customer_id"
TIMESTAMP_FIELD = "event_timestamp"
CREATED_FIELD = "created_at"


class SnapshotError(ValueError):
    """A snapshot cannot be built (no data, or a time outside it)."""


@dataclass(frozen=True)
class SnapshotResult:
    as_of: datetime
    path: Path
    rows: int
    seconds: float


def snapshot_dir(home: Path) -> Path:
    return home / SNAPSHOT_DIR


def snapshot_glob(home: Path) -> str:
    """The Parquet glob Feast reads as the snapshot source."""
    return str(snapshot_dir(home) / "*.parquet")


_FILE_TIME = "%Y%m%dT%H%M%SZ"


def snapshot_file(home: Path, as_of: datetime) -> Path:
    return snapshot_dir(home) / f"as_of={to_utc(as_of).strftime(_FILE_TIME)}.parquet"


def snapshot_times_on_disk(home: Path) -> list[datetime]:
    """The times of the snapshot files under ``home``, oldest first (read from the file names)."""
    files = snapshot_dir(home).glob("as_of=*.parquet")
    return sorted(to_utc(datetime.strptime(f.stem.removeprefix("as_of="), _FILE_TIME)) for f in files)


def to_utc(ts: datetime | str | pd.Timestamp) -> datetime:
    """A timezone-aware UTC datetime; a value without an offset is taken as UTC (as in the contract)."""
    try:
        stamp = pd.Timestamp(ts)
    except (ValueError, TypeError) as exc:
        raise SnapshotError(f"'{ts}' is not a timestamp (use ISO 8601, e.g. 2025-06-01T00:00:00Z)") from exc
    if pd.isna(stamp):
        raise SnapshotError(f"'{ts}' is not a timestamp (use ISO 8601, e.g. 2025-06-01T00:00:00Z)")
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return stamp.to_pydatetime()


def _lit(ts: datetime) -> str:
    """A naive-UTC TIMESTAMP literal (the warehouse stores naive UTC)."""
    return f"TIMESTAMP '{to_utc(ts).replace(tzinfo=None).isoformat(sep=' ')}'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _days_since(col: str, t: str) -> str:
    return f"(epoch_us({t}) - epoch_us({col})) / 86400e6"


def snapshot_sql(as_of: datetime, cfg: FeatureConfig, profile_columns: dict[str, str]) -> str:
    """The query computing one snapshot at ``as_of`` (see the module docstring for the rules)."""
    t = _lit(as_of)

    def since(days: int) -> str:
        return f"event_at >= {t} - INTERVAL {days} DAY"

    age_days = _days_since("event_at", t)
    # Observed history in the last year, in days (at least one, so rates stay finite).
    observed = f"greatest(least({_days_since('a.first_activity_at', t)}, 365), 1)"

    ev = [
        "max(event_at) FILTER (WHERE event_type = 'purchase') AS last_purchase_at",
        "min(event_at) FILTER (WHERE event_type = 'purchase') AS first_purchase_at",
        "count(*) FILTER (WHERE event_type = 'purchase') AS orders_lifetime",
        "coalesce(sum(amount) FILTER (WHERE event_type = 'purchase'), 0) AS revenue_lifetime",
        "max(event_at) AS last_activity_at",
        "min(event_at) AS first_activity_at",
        "max(event_at) FILTER (WHERE event_type = 'session') AS last_session_at",
        f"count(*) FILTER (WHERE event_type = 'session' AND {since(365)}) AS sessions_365d",
        f"sum(exp(-{age_days} / 30.0)) FILTER (WHERE event_type = 'session') AS sessions_decayed_30d",
        f"sum(exp(-{age_days} / 60.0)) FILTER (WHERE event_type = 'purchase') AS orders_decayed_60d",
        "max(event_at) FILTER (WHERE event_type = 'support_ticket' OR (event_type = 'complaint'"
        " AND coalesce(channel, '') NOT IN ('email', 'sms', 'push'))) AS last_support_contact_at",
        f"count(DISTINCT CAST(event_at AS DATE)) FILTER (WHERE {since(30)}) AS active_days_30d",
        "max(event_at) FILTER (WHERE event_type = 'support_ticket') AS last_ticket_at",
        "max(event_at) FILTER (WHERE event_type = 'complaint') AS last_complaint_at",
        "max(event_at) FILTER (WHERE event_type = 'unsubscribe') AS last_unsubscribe_at",
        f"count(*) FILTER (WHERE event_type = 'unsubscribe' AND {since(30)}) AS unsubscribes_30d",
        f"count(*) FILTER (WHERE event_type = 'purchase' AND offer_id IS NOT NULL AND {since(365)})"
        " AS redemptions_365d",
    ]
    for w in MONEY_WINDOWS:
        ev.append(f"count(*) FILTER (WHERE event_type = 'purchase' AND {since(w)}) AS orders_{w}d")
        ev.append(
            f"coalesce(sum(amount) FILTER (WHERE event_type = 'purchase' AND {since(w)}), 0) AS revenue_{w}d"
        )
    for metric, pred in ENGAGEMENT_METRICS.items():
        for w in WINDOWS:
            ev.append(f"count(*) FILTER (WHERE {pred} AND {since(w)}) AS {metric}_{w}d")
        ev.append(
            f"count(*) FILTER (WHERE {pred} AND {since(90)} AND event_at < {t} - INTERVAL 30 DAY)"
            f" AS {metric}_prev60d"
        )
    for kind, event_type in (("tickets", "support_ticket"), ("complaints", "complaint")):
        for w in (30, 90, 365):
            ev.append(f"count(*) FILTER (WHERE event_type = '{event_type}' AND {since(w)}) AS {kind}_{w}d")
    for ch in CONSENT_CHANNELS:
        # An unsubscribe without a channel withdraws consent everywhere.
        ev.append(
            f"coalesce(bool_or(event_type = 'unsubscribe' AND (channel = '{ch}' OR channel IS NULL)), false)"
            f" AS unsub_{ch}"
        )

    def sent_since(days: int) -> str:
        return f"sent_at >= {t} - INTERVAL {days} DAY"

    matured = f"{sent_since(365)} AND sent_at < {t} - INTERVAL 1 DAY"
    ex = [
        f"count(*) FILTER (WHERE {sent_since(30)}) AS messages_30d",
        f"count(*) FILTER (WHERE {sent_since(90)}) AS messages_90d",
        f"count(*) FILTER (WHERE {sent_since(365)}) AS messages_365d",
        f"count(*) FILTER (WHERE x.offer_id IS NULL AND {sent_since(365)}) AS control_messages_365d",
        f"count(*) FILTER (WHERE opened_at < {t} AND {sent_since(365)}) AS opened_365d",
        "max(sent_at) AS last_message_at",
        # A send's conversion is read only once a day has passed since it (the label's own window).
        f"count(*) FILTER (WHERE x.offer_id IS NULL AND {matured}) AS control_sends_matured_365d",
        f"count(*) FILTER (WHERE x.offer_id IS NULL AND converted AND {matured}) AS control_conversions_365d",
        f"count(*) FILTER (WHERE x.offer_id IS NOT NULL AND {matured}) AS offer_sends_matured_365d",
        f"count(*) FILTER (WHERE x.offer_id IS NOT NULL AND converted AND {matured}) AS offer_conversions_365d",
    ] + [
        f"count(*) FILTER (WHERE kind_bucket = '{k}' AND {sent_since(365)}) AS offers_{k}_sent_365d"
        for k in OFFER_KINDS
    ]
    red = [f"count(*) FILTER (WHERE kind_bucket = '{k}') AS offers_{k}_redeemed_365d" for k in OFFER_KINDS]
    # Count per (customer, channel, local hour) first, then pivot: the timezone conversion then runs
    # once per event instead of once per pivot column.
    hp_channel = "CASE " + " ".join(f"WHEN {pred} THEN '{ch}'" for ch, pred in HOUR_PROFILE_CHANNELS.items()) + " END"
    hp = [f"sum(n) FILTER (WHERE ch = '{ch}') AS {ch}_engagements_365d" for ch in HOUR_PROFILE_CHANNELS]
    hp.append("map(list(ch || ':' || local_hour), list(n)) AS n_at")  # per channel:hour, read back per column
    # Sends and opens per (channel, local hour) go into two maps keyed by channel:hour, read back per
    # column: hundreds of FILTER aggregates would cost more than the rest of the snapshot together.
    hour_event_types = "('email_open', 'email_click', 'sms_click', 'push_open', 'session', 'page_view')"
    kinds = ", ".join(f"'{k}'" for k in OFFER_KINDS[:-1])
    # A message without an offer is the control arm: no offer kind at all.
    kind_bucket = (
        f"CASE WHEN e.offer_id IS NULL THEN NULL WHEN o.kind IN ({kinds}) THEN o.kind ELSE 'other' END AS kind_bucket"
    )

    derived = [
        f"{_days_since('c.signup_at', t)} AS tenure_days",
        f"{_days_since('a.last_purchase_at', t)} AS days_since_last_purchase",
        f"{_days_since('a.first_purchase_at', t)} AS days_since_first_purchase",
        "coalesce(a.orders_lifetime, 0) AS orders_lifetime",
        "coalesce(a.revenue_lifetime, 0)::DOUBLE AS revenue_lifetime",
    ]
    for w in MONEY_WINDOWS:
        derived += [
            f"coalesce(a.orders_{w}d, 0) AS orders_{w}d",
            f"coalesce(a.revenue_{w}d, 0)::DOUBLE AS revenue_{w}d",
        ]
    derived += [
        "a.revenue_365d / nullif(a.orders_365d, 0) AS avg_order_value_365d",
        f"30.0 * a.orders_365d / {observed} AS orders_per_30d_365d",
        "coalesce(a.orders_decayed_60d, 0)::DOUBLE AS orders_decayed_60d",
        f"{_days_since('a.last_purchase_at', t)} * a.orders_365d / {observed} AS purchase_gap_ratio",
    ]
    for metric in ENGAGEMENT_METRICS:
        derived += [f"coalesce(a.{metric}_{w}d, 0) AS {metric}_{w}d" for w in WINDOWS]
        derived.append(
            f"(coalesce(a.{metric}_30d, 0) - coalesce(a.{metric}_prev60d, 0) / 2.0)"
            f" / (coalesce(a.{metric}_prev60d, 0) / 2.0 + 1) AS {metric}_trend"
        )
    derived += [
        f"{_days_since('a.last_activity_at', t)} AS days_since_last_activity",
        "coalesce(a.active_days_30d, 0) AS active_days_30d",
        f"{_days_since('a.first_activity_at', t)} AS history_days",
        f"{_days_since('a.last_session_at', t)} AS days_since_last_session",
        f"30.0 * a.sessions_365d / {observed} AS sessions_per_30d_365d",
        "coalesce(a.sessions_decayed_30d, 0)::DOUBLE AS sessions_decayed_30d",
        f"{_days_since('a.last_session_at', t)} * a.sessions_365d / {observed} AS session_gap_ratio",
        f"(a.sessions_30d / least({observed}, 30.0)) / nullif(a.sessions_365d / {observed}, 0)"
        " AS sessions_30d_vs_365d",
    ]
    for kind in ("tickets", "complaints"):
        derived += [f"coalesce(a.{kind}_{w}d, 0) AS {kind}_{w}d" for w in (30, 90, 365)]
        derived.append(f"{_days_since(f'a.last_{kind[:-1]}_at', t)} AS days_since_last_{kind[:-1]}")
    derived.append(f"{_days_since('a.last_support_contact_at', t)} AS days_since_last_support_contact")
    derived += [
        f"(coalesce(c.{ch}_opt_in, true) AND NOT coalesce(a.unsub_{ch}, false)) AS {ch}_consent"
        for ch in CONSENT_CHANNELS
    ]
    derived += [
        "coalesce(a.unsubscribes_30d, 0) AS unsubscribes_30d",
        f"{_days_since('a.last_unsubscribe_at', t)} AS days_since_unsubscribe",
        "coalesce(x.messages_30d, 0) AS messages_30d",
        "coalesce(x.messages_90d, 0) AS messages_90d",
        "coalesce(x.messages_365d, 0) AS messages_365d",
        "coalesce(x.control_messages_365d, 0) AS control_messages_365d",
        "x.opened_365d / nullif(x.messages_365d, 0) AS message_open_rate_365d",
        f"{_days_since('x.last_message_at', t)} AS days_since_last_message",
        "coalesce(a.redemptions_365d, 0) AS redemptions_365d",
        "a.redemptions_365d / nullif(a.orders_365d, 0) AS redemption_share_365d",
    ]
    for arm in ("control", "offer"):
        derived += [f"coalesce(x.{arm}_sends_matured_365d, 0) AS {arm}_sends_matured_365d",
                    f"coalesce(x.{arm}_conversions_365d, 0) AS {arm}_conversions_365d"]
    derived.append(
        "(coalesce(x.offer_conversions_365d, 0) + 0.1) / (coalesce(x.offer_sends_matured_365d, 0) + 1)"
        " - (coalesce(x.control_conversions_365d, 0) + 0.1) / (coalesce(x.control_sends_matured_365d, 0) + 1)"
        " AS offer_uplift_365d"
    )
    for k in OFFER_KINDS:
        derived += [
            f"coalesce(x.offers_{k}_sent_365d, 0) AS offers_{k}_sent_365d",
            f"coalesce(r.offers_{k}_redeemed_365d, 0) AS offers_{k}_redeemed_365d",
        ]
    # The hour vectors are list features: one column (and one online field) of 24 values each.
    def vector(cells: list[str], cast: str, name: str) -> str:
        return f"[{', '.join(cells)}]::{cast}[] AS {name}"

    for ch in HOUR_PROFILE_CHANNELS:
        for what in ("sent", "opened"):
            cells = [f"coalesce(xh.{what}['{ch}:{hr}'], 0)" for hr in range(24)]
            derived.append(vector(cells, "BIGINT", f"{ch}_{what}_by_hour"))
    for ch in HOUR_PROFILE_CHANNELS:
        derived.append(f"coalesce(h.{ch}_engagements_365d, 0)::BIGINT AS {ch}_engagements_365d")
        share = f"coalesce(h.n_at['{ch}:{{hr}}'] / nullif(h.{ch}_engagements_365d, 0), 0)"
        derived.append(vector([share.format(hr=hr) for hr in range(24)], "DOUBLE", f"{ch}_hour_shares"))
    derived += [
        "c.timezone AS timezone",
        f"(epoch_us(timezone(c.timezone, {t}::TIMESTAMPTZ)) - epoch_us({t})) / 3600e6 AS utc_offset_hours",
        "c.country AS country",
    ]
    for name, kind in sorted(profile_columns.items()):
        cast = "DOUBLE" if kind == "numeric" else "VARCHAR"
        derived.append(f"CAST(c.{_ident(name)} AS {cast}) AS {_ident(PROFILE_ATTRIBUTE_PREFIX + name)}")

    return f"""
WITH cust AS (
    SELECT * FROM customers WHERE signup_at < {t}
),
offer_catalog AS (SELECT offer_id, kind FROM offers),
a AS (
    SELECT customer_id, {", ".join(ev)}
    FROM events WHERE event_at < {t}
    GROUP BY customer_id
),
x AS (
    SELECT customer_id, {", ".join(ex)}
    FROM (SELECT e.*, {kind_bucket} FROM exposures e LEFT JOIN offer_catalog o USING (offer_id)
          WHERE e.sent_at < {t}) x
    GROUP BY customer_id
),
r AS (
    SELECT customer_id, {", ".join(red)}
    FROM (SELECT e.customer_id, {kind_bucket} FROM events e JOIN offer_catalog o USING (offer_id)
          WHERE e.event_type = 'purchase' AND e.event_at < {t} AND e.event_at >= {t} - INTERVAL 365 DAY)
    GROUP BY customer_id
),
h_long AS (
    SELECT customer_id, ch, local_hour, count(*) AS n
    FROM (SELECT e.customer_id, {hp_channel} AS ch,
                 hour(timezone(c.timezone, e.event_at::TIMESTAMPTZ)) AS local_hour
          FROM events e JOIN cust c USING (customer_id)
          WHERE e.event_at < {t} AND e.event_at >= {t} - INTERVAL 365 DAY
            AND e.event_type IN {hour_event_types})
    WHERE ch IS NOT NULL
    GROUP BY ALL
),
h AS (
    SELECT customer_id, {", ".join(hp)}
    FROM h_long
    GROUP BY customer_id
),
xh_long AS (
    SELECT customer_id, channel, local_hour, count(*) AS sends, count(*) FILTER (WHERE opened) AS opens
    FROM (SELECT e.customer_id, e.channel, hour(timezone(c.timezone, e.sent_at::TIMESTAMPTZ)) AS local_hour,
                 coalesce(e.opened_at < {t} AND e.opened_at < e.sent_at + INTERVAL 24 HOUR, false) AS opened
          FROM exposures e JOIN cust c USING (customer_id)
          WHERE {matured})
    GROUP BY ALL
),
xh AS (
    SELECT customer_id, map(list(channel || ':' || local_hour), list(sends)) AS sent,
           map(list(channel || ':' || local_hour), list(opens)) AS opened
    FROM xh_long
    GROUP BY customer_id
),
base AS (
    SELECT c.customer_id, {", ".join(derived)}
    FROM cust c
    LEFT JOIN a USING (customer_id)
    LEFT JOIN x USING (customer_id)
    LEFT JOIN r USING (customer_id)
    LEFT JOIN h USING (customer_id)
    LEFT JOIN xh USING (customer_id)
),
ranked AS (
    SELECT *,
        CASE WHEN orders_365d > 0
             THEN percent_rank() OVER (PARTITION BY orders_365d > 0 ORDER BY revenue_365d)
             ELSE 0 END::DOUBLE AS spend_percentile_365d
    FROM base
)
SELECT *, {segment_sql(cfg.segments)} AS segment,
       {t}::TIMESTAMPTZ AS {TIMESTAMP_FIELD},
       now()::TIMESTAMPTZ AS {CREATED_FIELD}
FROM ranked
ORDER BY customer_id
"""


def profile_columns(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    """The warehouse's extra customer columns: ``{name: 'numeric'|'categorical'}``."""
    return dict(con.execute("SELECT name, kind FROM profile_columns ORDER BY name").fetchall())


def default_as_of(con: duckdb.DuckDBPyConnection) -> datetime:
    """Just after the last loaded event: the next whole second after it."""
    (last,) = con.execute("SELECT max(event_at) FROM events").fetchall()[0]
    if last is None:
        raise SnapshotError("no events are loaded: run `engage ingest DIR` first")
    return to_utc(last.replace(microsecond=0) + timedelta(seconds=1))


def data_range(con: duckdb.DuckDBPyConnection) -> tuple[datetime, datetime]:
    """First signup and last event in the warehouse (UTC)."""
    first, last = con.execute(
        "SELECT (SELECT min(signup_at) FROM customers), (SELECT max(event_at) FROM events)"
    ).fetchall()[0]
    if first is None or last is None:
        raise SnapshotError("the warehouse is empty: run `engage ingest DIR` first")
    return to_utc(first), to_utc(last)


def checked_as_of(con: duckdb.DuckDBPyConnection, as_of: datetime | str | None,
                  error: type[Exception] = SnapshotError) -> datetime:
    """``as_of`` (default: :func:`default_as_of`) as UTC, raising ``error`` when it is not after the first signup
    or is after the default (the loaded data say nothing about later times)."""
    first_signup, last_event = data_range(con)
    latest = default_as_of(con)
    t = latest if as_of is None else to_utc(as_of)
    if t <= first_signup or t > latest:
        raise error(f"--as-of {t:%Y-%m-%d %H:%M:%S}Z is outside the data "
                    f"({first_signup:%Y-%m-%d} to {last_event:%Y-%m-%d})")
    return t


def build_snapshots(
    con: duckdb.DuckDBPyConnection,
    home: Path,
    cfg: FeatureConfig,
    as_of: Iterable[datetime | str] | None = None,
    *,
    on_done: callable | None = None,
) -> list[SnapshotResult]:
    """Compute and write one snapshot file per time in ``as_of`` (default: just after the last event).

    Args:
        con: a connection to the warehouse (read-only is enough).
        home: ENGAGE_HOME; files go to ``<home>/feature_data/customer_snapshots/``.
        cfg: feature settings (segment thresholds).
        as_of: snapshot times; naive values are UTC.
        on_done: called with each ``SnapshotResult`` as it lands (progress reporting).
    """
    con.execute("SET TimeZone = 'UTC'")
    times: Sequence[datetime] = (
        [default_as_of(con)] if as_of is None else sorted({to_utc(t) for t in as_of})
    )
    if not times:
        raise SnapshotError("no snapshot times given")
    first_signup, _ = data_range(con)
    for t in times:
        if t <= first_signup:
            raise SnapshotError(
                f"as-of {t:%Y-%m-%d %H:%M:%S}Z is not after the first signup ({first_signup:%Y-%m-%d}): "
                "no customer exists yet"
            )
    cols = profile_columns(con)
    out_dir = snapshot_dir(home)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for t in times:
        started = time.perf_counter()
        final = snapshot_file(home, t)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        try:
            con.execute(
                f"COPY ({snapshot_sql(t, cfg, cols)}) TO '{tmp}' (FORMAT parquet, COMPRESSION zstd)"
            )
            (rows,) = con.execute(f"SELECT count(*) FROM read_parquet('{tmp}')").fetchall()[0]
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        result = SnapshotResult(t, final, rows, time.perf_counter() - started)
        results.append(result)
        if on_done:
            on_done(result)
    return results


def snapshot_times(start: datetime, end: datetime, every_days: int) -> list[datetime]:
    """Snapshot times from ``start`` to ``end`` inclusive, ``every_days`` apart, at midnight UTC."""
    first = to_utc(start).replace(hour=0, minute=0, second=0, microsecond=0)
    step = timedelta(days=every_days)
    out, t = [], first
    while t <= to_utc(end):
        out.append(t)
        t += step
    return out
