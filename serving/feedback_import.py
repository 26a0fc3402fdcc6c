"""Feed stored feedback back into the warehouse, so the next training run learns from it.

Sent, settled feedback becomes contract rows, written as Parquet into a temporary folder and loaded
by the project's own loader (``features.load.ingest``), so the contract's checks and rejects apply:

- ``exposures``: one row per sent message (exposure_id, customer_id, sent_at, channel, offer_id,
  propensity, opened_at, clicked, converted, revenue);
- ``events`` with deterministic ids: ``fb:<exposure_id>:open`` (email_open / push_open at opened_at),
  ``fb:<exposure_id>:click`` (email_click / sms_click), ``fb:<exposure_id>:purchase`` (amount = revenue,
  the offer, at opened_at or else sent_at).

The loader requires a customers file; an empty one (the columns, no rows) changes no customer.
It never updates a loaded exposure (a known exposure_id counts as already loaded), so an exposure
is imported only once it is ``settle_after`` old: its outcomes are then final. Later changes are
counted as ``stale``; their new events still load. Exposures of customers not yet in the warehouse
(cold starts) wait for a later import, and rows the loader rejected are not offered again.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from features.load import IngestReport, connect_warehouse, ingest, warehouse_path
from serving.servingdb import feedback

log = logging.getLogger(__name__)

SETTLE_AFTER = timedelta(days=7)
_FOLDER_PREFIX = "engage-feedback-import-"  # in rejects.source_file: tells our rejected rows apart
_OPEN_EVENT = {"email": "email_open", "push": "push_open"}  # channels whose opens are contract events
_CLICK_EVENT = {"email": "email_click", "sms": "sms_click"}
_EXPOSURE_COLUMNS = ["exposure_id", "customer_id", "sent_at", "channel", "offer_id", "propensity",
                     "opened_at", "clicked", "converted", "revenue"]  # fmt: skip
_EVENT_COLUMNS = ["event_id", "customer_id", "event_at", "event_type", "channel", "amount", "offer_id"]


@dataclass
class ImportReport:
    """What one import did. ``exposures_*`` and ``events_*`` are the loader's counts."""

    candidates: int = 0  # sent feedback rows
    not_settled: int = 0  # sent less than settle_after ago: wait
    unknown_customer: int = 0  # customer not in the warehouse yet: wait
    previously_rejected: int = 0  # rejected by an earlier import: not offered again
    stale: int = 0  # already loaded, and the feedback has changed since (the loader keeps the old row)
    exposures_inserted: int = 0
    exposures_already_loaded: int = 0
    exposures_rejected: int = 0
    events_inserted: int = 0
    events_already_loaded: int = 0
    events_rejected: int = 0
    ingest: IngestReport | None = None


def import_feedback(
    home: Path, engine: Engine, *, now: datetime | None = None, settle_after: timedelta = SETTLE_AFTER
) -> ImportReport:
    """Load sent feedback older than ``settle_after`` into the warehouse under ``home``."""
    now = now or datetime.now(UTC)
    columns = [feedback.c[c] for c in _EXPOSURE_COLUMNS]
    query = sa.select(*columns).where(feedback.c.sent, feedback.c.sent_at.is_not(None))
    with engine.connect() as con:
        rows = pd.DataFrame(con.execute(query).mappings().all(), columns=_EXPOSURE_COLUMNS)
    report = ImportReport(candidates=len(rows))
    for c in ("sent_at", "opened_at"):
        rows[c] = _utc_us(rows[c])
    settled = rows["sent_at"] <= pd.Timestamp(now) - settle_after
    report.not_settled = int((~settled).sum())
    rows = rows[settled]

    known, loaded, rejected, loaded_events = _warehouse_state(home, rows, _events(rows)["event_id"])
    waiting = ~rows["customer_id"].isin(known)
    again = rows["exposure_id"].isin(rejected) & ~waiting
    report.unknown_customer, report.previously_rejected = int(waiting.sum()), int(again.sum())
    rows = rows[~waiting & ~again]
    report.stale = _count_stale(rows, loaded)
    exposures = rows[~rows["exposure_id"].isin(loaded.index)]
    events = _events(rows)
    new_events = ~events["event_id"].isin(loaded_events)
    report.exposures_already_loaded = len(rows) - len(exposures)
    report.events_already_loaded = int((~new_events).sum())
    events = events[new_events]
    if exposures.empty and events.empty:
        return report

    with tempfile.TemporaryDirectory(prefix=_FOLDER_PREFIX) as tmp:
        folder = Path(tmp)
        _empty_customers().to_parquet(folder / "customers.parquet", index=False)
        events.to_parquet(folder / "events.parquet", index=False)  # required, even with no rows
        if not exposures.empty:
            exposures.to_parquet(folder / "exposures.parquet", index=False)
        report.ingest = ingest(folder, home)
    for t in report.ingest.tables:
        if t.table in ("exposures", "events"):
            setattr(report, f"{t.table}_inserted", t.inserted)
            setattr(report, f"{t.table}_rejected", t.rejected)
            already = f"{t.table}_already_loaded"
            setattr(report, already, getattr(report, already) + t.already_loaded)
    log.info("feedback import: %d exposures and %d events inserted, %d and %d rejected",
             report.exposures_inserted, report.events_inserted, report.exposures_rejected, report.events_rejected)
    return report


def _warehouse_state(
    home: Path, rows: pd.DataFrame, event_ids: pd.Series
) -> tuple[set[str], pd.DataFrame, set[str], set[str]]:
    """Known customers, loaded exposures (indexed by id), exposures rejected before, loaded event ids."""
    empty = pd.DataFrame(columns=_EXPOSURE_COLUMNS).set_index("exposure_id")
    if rows.empty or not warehouse_path(home).exists():
        return set(), empty, set(), set()
    customers, exposures = list(rows["customer_id"].unique()), list(rows["exposure_id"])
    with contextlib.closing(connect_warehouse(home, read_only=True)) as con:
        known = {c for (c,) in con.execute(
            "SELECT customer_id FROM customers WHERE customer_id IN (SELECT unnest(?::VARCHAR[]))", [customers]
        ).fetchall()}  # fmt: skip
        loaded = con.execute(
            "SELECT exposure_id, opened_at, clicked, converted, revenue FROM exposures "
            "WHERE exposure_id IN (SELECT unnest(?::VARCHAR[]))",
            [exposures],
        ).df()
        rejected = {r for (r,) in con.execute(
            "SELECT DISTINCT json_extract_string(original, '$.exposure_id') FROM rejects "
            "WHERE table_name = 'exposures' AND source_file LIKE ?", [f"%{_FOLDER_PREFIX}%"]
        ).fetchall()}  # fmt: skip
        events = {e for (e,) in con.execute(
            "SELECT event_id FROM events WHERE event_id IN (SELECT unnest(?::VARCHAR[]))", [list(event_ids)]
        ).fetchall()}  # fmt: skip
    return known, loaded.set_index("exposure_id"), rejected, events


def _count_stale(rows: pd.DataFrame, loaded: pd.DataFrame) -> int:
    """Loaded exposures whose stored feedback now says something else."""
    if loaded.empty:
        return 0
    both = rows.set_index("exposure_id").join(loaded, how="inner", rsuffix="_wh")
    opened_wh = pd.to_datetime(both["opened_at_wh"], utc=True)
    differs = (
        (both["opened_at"].notna() & opened_wh.isna())
        | (both["clicked"].astype(bool) & ~both["clicked_wh"].astype(bool))
        | (both["converted"].astype(bool) & ~both["converted_wh"].astype(bool))
        | (both["revenue"] > both["revenue_wh"].astype(float) + 1e-9)
    )
    if differs.any():
        log.warning("feedback import: %d loaded exposures have later outcomes the warehouse keeps out", differs.sum())
    return int(differs.sum())


def _events(rows: pd.DataFrame) -> pd.DataFrame:
    """Contract events derived from the outcomes, with ids that make a re-import add nothing."""
    out = []
    for r in rows.itertuples(index=False):
        opened_at = None if pd.isna(r.opened_at) else r.opened_at
        if opened_at is not None and r.channel in _OPEN_EVENT:
            out.append((f"fb:{r.exposure_id}:open", r.customer_id, opened_at, _OPEN_EVENT[r.channel], r.channel,
                        None, None))  # fmt: skip
        if r.clicked and r.channel in _CLICK_EVENT:
            out.append((f"fb:{r.exposure_id}:click", r.customer_id, opened_at or r.sent_at, _CLICK_EVENT[r.channel],
                        r.channel, None, None))  # fmt: skip
        if r.converted:
            out.append((f"fb:{r.exposure_id}:purchase", r.customer_id, opened_at or r.sent_at, "purchase", r.channel,
                        float(r.revenue), r.offer_id))  # fmt: skip
    events = pd.DataFrame(out, columns=_EVENT_COLUMNS)
    events["event_at"] = _utc_us(events["event_at"])
    events["amount"] = events["amount"].astype("float64")
    for c in ("event_id", "customer_id", "event_type", "channel", "offer_id"):
        events[c] = events[c].astype("object")
    return events


def _utc_us(values: pd.Series) -> pd.Series:
    """UTC timestamps in microseconds: the loader cannot cast Parquet's TIMESTAMPTZ_NS (pandas' default)."""
    return pd.to_datetime(values, utc=True).astype("datetime64[us, UTC]")


def _empty_customers() -> pd.DataFrame:
    """The loader needs a customers file; one with no rows leaves every customer as it is."""
    return pd.DataFrame({"customer_id": pd.Series([], dtype="object"),
                         "signup_at": pd.Series([], dtype="datetime64[us, UTC]")})  # fmt: skip
