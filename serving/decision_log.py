"""The decision log: every answer the service gives, appended without waiting for the database.

``append`` only takes a lock and adds to a list; a background thread writes the pending records
in batches, one transaction each. While the database is unreachable, records stay pending and
are retried on the next tick; only beyond ``max_pending`` are the oldest dropped (and counted).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError

from serving.servingdb import RowInserter, as_utc, decisions
from serving.settings import DECISION_FLUSH_S
from serving.types import Decision

log = logging.getLogger(__name__)

BATCH_SIZE = 5_000  # records per transaction
_REF_COLUMNS = ("request_id", "exposure_id", "customer_id", "decided_at", "chosen_offer", "channel", "propensity")


@dataclass(frozen=True)
class DecisionRef:
    """What feedback needs to know about the decision behind an exposure."""

    request_id: str
    exposure_id: str
    customer_id: str
    decided_at: datetime
    chosen_offer: str | None
    channel: str | None
    propensity: float | None


@dataclass(frozen=True)
class LogStats:
    appended: int
    flushed: int
    dropped: int
    flush_errors: int
    pending: int
    last_error: str | None


def decision_record(
    decision: Decision, request_id: str, exposure_id: str | None, decided_at: datetime, source: str
) -> dict[str, Any]:
    """A JSON-safe record of ``decision`` for :meth:`DecisionLog.append` (datetimes as ISO 8601)."""
    payload = {
        k: _json_safe(getattr(decision, k))
        for k in ("churn_probability", "risk_tier", "segment", "reasons", "offers", "channels", "suppressions",
                  "send_at_local", "expected_open_rate", "expected_value_at_risk", "intended_action",
                  "feature_age_s", "stale_views", "missing_models")
    }  # fmt: skip
    return {
        "decision_id": uuid.uuid4().hex,
        "request_id": request_id,
        "exposure_id": exposure_id,
        "customer_id": decision.customer_id,
        "decided_at": _json_safe(decided_at),
        "source": source,
        "action": decision.action,
        "reason": decision.reason,
        "chosen_offer": decision.chosen_offer,
        "channel": decision.channel,
        "send_at": _json_safe(decision.send_at),
        "propensity": _json_safe(decision.propensity),
        "cold_start": bool(decision.cold_start),
        "degraded": bool(decision.degraded),
        "holdout": bool(decision.holdout),
        "feature_timestamp": _json_safe(decision.feature_timestamp),
        "model_versions": _json_safe(dict(decision.model_versions)),
        "payload": payload,
    }


def _json_safe(value: Any) -> Any:
    kind = type(value)
    if value is None or kind is str or kind is int or kind is bool:  # most values: checked first, cheaply
        return value
    if kind is float:
        return value if math.isfinite(value) else None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        state = getattr(value, "__dict__", None)  # every field, in order, unless the class uses __slots__
        if state is None:
            state = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return {k: _json_safe(v) for k, v in state.items()}
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset | np.ndarray):
        return [_json_safe(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return None if np.isnan(value) or np.isinf(value) else float(value)
    return value


def lookup_decision(engine: Engine, exposure_id: str) -> DecisionRef | None:
    """The logged decision for ``exposure_id`` from the table (not the pending buffer)."""
    cols = [decisions.c[name] for name in _REF_COLUMNS]
    with engine.connect() as con:
        row = con.execute(sa.select(*cols).where(decisions.c.exposure_id == exposure_id)).first()
    return DecisionRef(**row._asdict()) if row else None


class DecisionLog:
    """Buffered, batched, retrying writer of decision records (see :func:`decision_record`)."""

    def __init__(self, engine: Engine, flush_interval_s: float = DECISION_FLUSH_S, max_pending: int = 200_000) -> None:
        self.engine = engine
        self.flush_interval_s = flush_interval_s
        self.max_pending = max_pending
        self._lock = threading.Lock()  # guards the buffer and counters; never held during I/O
        self._flush_lock = threading.Lock()  # one flush at a time
        self._pending: deque[tuple[int, dict[str, Any]]] = deque()
        self._by_exposure: dict[str, dict[str, Any]] = {}
        self._seq = 0
        self._appended = self._flushed = self._dropped = self._errors = 0
        self._last_error: str | None = None
        self._last_drop_warning = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._inserter = RowInserter(engine, decisions)

    def append(self, record: dict[str, Any]) -> None:
        """Queue one record; never waits for the database."""
        with self._lock:
            self._seq += 1
            self._pending.append((self._seq, record))
            self._appended += 1
            if record.get("exposure_id"):
                self._by_exposure[record["exposure_id"]] = record
            if len(self._pending) > self.max_pending:
                self._drop_oldest(len(self._pending) - self.max_pending)

    def _drop_oldest(self, n: int) -> None:
        for _ in range(n):
            _, old = self._pending.popleft()
            self._forget(old)
        self._dropped += n
        now = time.monotonic()
        if now - self._last_drop_warning > 5:
            self._last_drop_warning = now
            log.warning("decision log: over %d pending records, dropped the oldest (%d so far)",
                        self.max_pending, self._dropped)  # fmt: skip

    def _forget(self, record: dict[str, Any]) -> None:
        exposure_id = record.get("exposure_id")
        if exposure_id and self._by_exposure.get(exposure_id) is record:
            del self._by_exposure[exposure_id]

    def start(self) -> DecisionLog:
        """Start the background writer (idempotent)."""
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._run, name="decision-log", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            self.flush()

    def flush(self) -> int:
        """Write everything pending now, in batches; returns how many were written. Never raises."""
        written = 0
        with self._flush_lock:
            while True:
                with self._lock:
                    batch = list(itertools.islice(self._pending, BATCH_SIZE))  # visible to lookup while in flight
                if not batch:
                    return written
                try:
                    try:
                        self._write([r for _, r in batch])
                        self._done(batch[-1][0], len(batch))
                        written += len(batch)
                    except Exception as e:
                        if not _is_bad_data(e):
                            raise
                        written += self._write_one_by_one(batch)
                except Exception as e:  # the database is unreachable: keep the records for the next tick
                    with self._lock:
                        self._errors += 1
                        self._last_error = _describe(e)
                    log.warning("decision log: flush of %d records failed, will retry: %s", len(batch), _describe(e))
                    return written

    def _write(self, records: list[dict[str, Any]]) -> None:
        # Column lists through a prepared insert: this runs on a thread beside the requests and holds the GIL
        # while it prepares the rows, so its cost is paid by whichever answer is waiting (half of what
        # SQLAlchemy's per-row statement building took).
        columns = {c: [r.get(c) for r in records] for c in self._inserter.names}
        ids = columns["decision_id"]
        for i, record in enumerate(records):
            if not ids[i]:  # records built by hand: a key of their own, kept across retries
                ids[i] = record["decision_id"] = uuid.uuid4().hex
        columns["cold_start"] = [bool(v) for v in columns["cold_start"]]
        columns["degraded"] = [bool(v) for v in columns["degraded"]]
        with self.engine.begin() as con:
            self._inserter.insert(con, columns)

    def _write_one_by_one(self, batch: list[tuple[int, dict[str, Any]]]) -> int:
        """A batch with a record the database refuses: write the others, drop that one.

        Raises what is not about one record (the database went away), leaving the rest pending.
        """
        written = 0
        for seq, record in batch:
            try:
                self._write([record])
            except Exception as e:
                if not _is_bad_data(e):
                    raise
                with self._lock:
                    self._dropped += 1
                    self._last_error = _describe(e)
                log.error("decision log: dropped request %s, the database refused it: %s",
                          record.get("request_id"), _describe(e))  # fmt: skip
                self._done(seq, 0)
                continue
            self._done(seq, 1)
            written += 1
        return written

    def _done(self, last_seq: int, written: int) -> None:
        with self._lock:
            while self._pending and self._pending[0][0] <= last_seq:
                self._forget(self._pending.popleft()[1])
            self._flushed += written

    def close(self) -> None:
        """Stop the writer and write what is left (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.flush()
        if self._pending:
            log.error("decision log: closed with %d records not written: %s", len(self._pending), self._last_error)

    def lookup(self, exposure_id: str, grace_s: float | None = None) -> DecisionRef | None:
        """The decision for an exposure: pending records first, then the table.

        With several workers, the decision may sit in another worker's buffer for up to one flush
        interval; an exposure not found is looked up again until ``grace_s`` (default three flush
        intervals) has passed before it is called unknown.
        """
        with self._lock:
            record = self._by_exposure.get(exposure_id)
        if record is not None:
            ref = {k: record.get(k) for k in _REF_COLUMNS}
            return DecisionRef(**ref | {"decided_at": as_utc(ref["decided_at"])})
        deadline = time.monotonic() + (3 * self.flush_interval_s if grace_s is None else grace_s)
        while True:
            found = lookup_decision(self.engine, exposure_id)
            if found is not None or time.monotonic() >= deadline:
                return found
            time.sleep(min(self.flush_interval_s / 2, max(deadline - time.monotonic(), 0.0)))

    @property
    def stats(self) -> LogStats:
        with self._lock:
            return LogStats(self._appended, self._flushed, self._dropped, self._errors, len(self._pending),
                            self._last_error)  # fmt: skip


def _is_bad_data(e: Exception) -> bool:
    """True for a record the database will never accept (as opposed to a database that is down)."""
    if isinstance(e, DataError | IntegrityError):
        return True
    return not isinstance(e, DBAPIError) and isinstance(e, sa.exc.StatementError | TypeError | ValueError)


def _describe(e: Exception) -> str:
    """An error without the statement's parameters (which carry customer data)."""
    return f"{type(e).__name__}: {getattr(e, 'orig', None) or e}".splitlines()[0][:300]
