"""Feedback: what happened to the messages the service recommended, stored durably and idempotently.

One row per exposure. Feedback for an exposure is checked against its logged decision, then merged
into the stored row by one ``INSERT .. ON CONFLICT DO UPDATE``: outcomes only ever turn on
(sent/opened/clicked/converted are OR-ed, revenue is the maximum, times the earliest), so
repeated and concurrent posts converge to the same row. ``record`` returns after the commit.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from serving.decision_log import DecisionLog, DecisionRef, lookup_decision
from serving.servingdb import as_utc, feedback, upsert

log = logging.getLogger(__name__)

_IN_CHUNK = 500  # customer ids per IN (...) list


class FeedbackError(Exception):
    """Base of the errors :meth:`FeedbackStore.record` raises."""


class UnknownExposure(FeedbackError):
    """The exposure_id is not in the decision log."""


class FeedbackConflict(FeedbackError):
    """The feedback names another customer, channel or offer than the decision."""


class FeedbackInvalid(FeedbackError):
    """The outcomes contradict each other (e.g. converted but not sent, negative revenue)."""


class StoreUnavailable(FeedbackError):
    """The database cannot be read or written; nothing was acknowledged."""


@dataclass
class Feedback:
    """The outcomes of one exposure as the engagement system knows them now (cumulative).

    ``channel`` and ``offer_id`` are optional; when given they must match the decision (``offer_id``
    None means "not stated", the decision's offer is stored). Without ``sent_at`` (``opened_at``) a sent
    (opened) message is taken as sent (opened) when the feedback arrives; a later post with the
    real, earlier time corrects it.
    """

    exposure_id: str
    customer_id: str
    sent: bool = False
    sent_at: datetime | None = None
    opened: bool = False
    opened_at: datetime | None = None
    clicked: bool = False
    converted: bool = False
    revenue: float = 0.0
    channel: str | None = None
    offer_id: str | None = None


@dataclass(frozen=True)
class RecordResult:
    """``stored``: this call added or changed the stored row; ``duplicate``: the exposure already had feedback."""

    stored: bool
    duplicate: bool


class FeedbackStore:
    """Validated, idempotent, durable feedback per exposure."""

    def __init__(self, engine: Engine, decisions: DecisionLog | None = None) -> None:
        self.engine = engine
        self.decisions = decisions
        # recent_sends runs on every recommendation: it keeps one connection open in autocommit mode instead of
        # checking one out of the pool per call, which on PostgreSQL costs a ping and a rollback round trip
        # (about 0.5 ms of a 0.6 ms read). A broken connection is dropped and the next call opens another.
        self._reader: sa.Connection | None = None
        self._reader_lock = threading.Lock()
        t = feedback
        ins = upsert(engine, t)
        x = ins.excluded
        changed = sa.or_(
            *[sa.and_(x[c], sa.not_(t.c[c])) for c in ("sent", "opened", "clicked", "converted")],
            x.revenue > t.c.revenue,
            *[sa.and_(x[c].is_not(None), sa.or_(t.c[c].is_(None), x[c] < t.c[c])) for c in ("sent_at", "opened_at")],
        )
        merged = {c: sa.or_(t.c[c], x[c]) for c in ("sent", "opened", "clicked", "converted")}
        merged["revenue"] = sa.case((x.revenue > t.c.revenue, x.revenue), else_=t.c.revenue)
        for c in ("sent_at", "opened_at"):
            merged[c] = sa.case(
                (t.c[c].is_(None), x[c]), (x[c].is_(None), t.c[c]), (x[c] < t.c[c], x[c]), else_=t.c[c]
            )
        merged["updated_at"] = x.updated_at
        # Nothing new: no row is touched and none returned, which marks a duplicate.
        self._upsert = ins.on_conflict_do_update(index_elements=[t.c.exposure_id], set_=merged, where=changed)
        self._upsert = self._upsert.returning(t.c.received_at)

    def record(self, fb: Feedback) -> RecordResult:
        """Check ``fb`` against its decision and merge it in; returns once committed.

        Raises:
            FeedbackInvalid, UnknownExposure, FeedbackConflict: nothing is stored.
            StoreUnavailable: the database could not be read or written.
        """
        opened = fb.opened or fb.opened_at is not None
        _validate(fb, opened)
        decision = self._decision(fb.exposure_id)
        _check_matches(fb, decision)
        now = datetime.now(UTC)
        sent_at = as_utc(fb.sent_at) if fb.sent_at is not None else (now if fb.sent else None)
        row = {
            "exposure_id": fb.exposure_id,
            "request_id": decision.request_id,
            "customer_id": decision.customer_id,
            "channel": decision.channel,
            "offer_id": decision.chosen_offer,
            "propensity": decision.propensity,
            "sent": bool(fb.sent),
            "sent_at": sent_at,
            "opened": bool(opened),
            "opened_at": as_utc(fb.opened_at) if fb.opened_at is not None else (now if opened else None),
            "clicked": bool(fb.clicked),
            "converted": bool(fb.converted),
            "revenue": float(fb.revenue),
            "received_at": now,
            "updated_at": now,
        }
        try:
            with self.engine.begin() as con:
                returned = con.execute(self._upsert, row).first()
        except SQLAlchemyError as e:
            log.warning("feedback for exposure %s not stored: %s", fb.exposure_id, type(e).__name__)
            raise StoreUnavailable("the feedback store cannot be written; retry later") from e
        if returned is None:
            return RecordResult(stored=False, duplicate=True)
        return RecordResult(stored=True, duplicate=as_utc(returned.received_at) != now)

    def _decision(self, exposure_id: str) -> DecisionRef:
        try:
            if self.decisions is not None:
                decision = self.decisions.lookup(exposure_id)
            else:
                decision = lookup_decision(self.engine, exposure_id)
        except SQLAlchemyError as e:
            raise StoreUnavailable("the decision log cannot be read; retry later") from e
        if decision is None:
            raise UnknownExposure(f"exposure_id {exposure_id!r} is not in the decision log")
        return decision

    def recent_sends(self, customer_ids: list[str], since: datetime) -> dict[str, list[datetime]]:
        """``sent_at`` of each customer's sent messages at or after ``since``, oldest first (every id a key)."""
        with self._reader_lock:
            # A connection kept from earlier calls may have died with its server (a restart): one retry on a
            # new connection tells that apart from a database that is down.
            attempts = 2 if self._reader is not None else 1
            while True:
                attempts -= 1
                try:
                    return self._sends(customer_ids, since)
                except SQLAlchemyError as e:
                    self._drop_reader()
                    if attempts == 0:
                        raise StoreUnavailable("the feedback store cannot be read") from e

    def _sends(self, customer_ids: list[str], since: datetime) -> dict[str, list[datetime]]:
        if self._reader is None:
            self._reader = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        out: dict[str, list[datetime]] = {c: [] for c in customer_ids}
        ids = list(out)
        if len(ids) == 1:  # a single recommendation: a statement without the IN list's per-call expansion
            for customer_id, sent_at in self._reader.execute(_RECENT_SENDS_ONE, {"id": ids[0], "since": since}):
                out[customer_id].append(sent_at)
            return out
        for i in range(0, len(ids), _IN_CHUNK):
            for customer_id, sent_at in self._reader.execute(_RECENT_SENDS, {"ids": ids[i : i + _IN_CHUNK],
                                                                             "since": since}):
                out[customer_id].append(sent_at)
        return out

    def _drop_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            try:
                reader.invalidate()  # perhaps broken (or shutting down): not back to the pool
                reader.close()
            except SQLAlchemyError:
                pass

    def close(self) -> None:
        """Release the kept-open read connection (the service's shutdown)."""
        with self._reader_lock:
            self._drop_reader()

    def count(self) -> int:
        """Stored feedback rows (one per exposure)."""
        with self.engine.connect() as con:
            return int(con.execute(sa.select(sa.func.count()).select_from(feedback)).scalar_one())


# Built once (its compiled form is cached): building the statement per request cost more than running it.
_RECENT_SENDS = (
    sa.select(feedback.c.customer_id, feedback.c.sent_at)
    .where(feedback.c.customer_id.in_(sa.bindparam("ids", expanding=True)), feedback.c.sent,
           feedback.c.sent_at >= sa.bindparam("since", type_=feedback.c.sent_at.type))
    .order_by(feedback.c.sent_at)
)
_RECENT_SENDS_ONE = (
    sa.select(feedback.c.customer_id, feedback.c.sent_at)
    .where(feedback.c.customer_id == sa.bindparam("id"), feedback.c.sent,
           feedback.c.sent_at >= sa.bindparam("since", type_=feedback.c.sent_at.type))
    .order_by(feedback.c.sent_at)
)


def _validate(fb: Feedback, opened: bool) -> None:
    problems = []
    if not fb.sent:
        happened = [name for name, flag in (("opened", opened), ("clicked", fb.clicked), ("converted", fb.converted))
                    if flag]  # fmt: skip
        if happened:
            problems.append(f"{' and '.join(happened)} but not sent")
    if fb.revenue < 0:
        problems.append(f"revenue {fb.revenue} is negative")
    elif fb.revenue > 0 and not fb.converted:
        problems.append("revenue without a conversion")
    if fb.sent_at is not None and fb.opened_at is not None and as_utc(fb.opened_at) < as_utc(fb.sent_at):
        problems.append("opened_at is before sent_at")
    if problems:
        raise FeedbackInvalid("; ".join(problems))


def _check_matches(fb: Feedback, decision: DecisionRef) -> None:
    for what, given, logged in (
        ("customer_id", fb.customer_id, decision.customer_id),
        ("channel", fb.channel, decision.channel),
        ("offer_id", fb.offer_id, decision.chosen_offer),
    ):
        if given is not None and given != logged:
            raise FeedbackConflict(f"{what} {given!r} does not match the decision's {logged!r}")
