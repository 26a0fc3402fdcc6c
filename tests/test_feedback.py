"""The feedback store: validation against the decision log, idempotent monotone merges, durability,
and concurrent writers (threads, processes; SQLite and PostgreSQL)."""

from __future__ import annotations

import multiprocessing
import random
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from serving.decision_log import DecisionLog
from serving.feedback import (
    Feedback,
    FeedbackConflict,
    FeedbackInvalid,
    FeedbackStore,
    StoreUnavailable,
    UnknownExposure,
)
from serving.servingdb import create_serving_engine, feedback

SENT = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
N_EXPOSURES = 60


def _decision(i: int) -> dict:
    return {
        "request_id": f"r{i}",
        "exposure_id": f"x{i}",
        "customer_id": f"C{i % 7}",
        "decided_at": SENT - timedelta(hours=1),
        "source": "api",
        "action": "retain",
        "chosen_offer": "OFF10" if i % 2 else None,
        "channel": "email",
        "propensity": 0.25,
        "cold_start": False,
        "degraded": False,
    }


def _log_decisions(engine: sa.Engine, n: int = N_EXPOSURES) -> DecisionLog:
    dlog = DecisionLog(engine)
    for i in range(n):
        dlog.append(_decision(i))
    dlog.flush()
    return dlog


def _rows(engine: sa.Engine) -> dict[str, dict]:
    with engine.connect() as con:
        return {r["exposure_id"]: dict(r) for r in con.execute(sa.select(feedback)).mappings()}


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "serving.db"


@pytest.fixture
def store(db_path: Path) -> FeedbackStore:
    engine = create_serving_engine(f"sqlite:///{db_path}")
    return FeedbackStore(engine, _log_decisions(engine))


def test_same_feedback_twice_is_stored_once(store: FeedbackStore) -> None:
    fb = Feedback("x1", "C1", sent=True, sent_at=SENT)
    assert store.record(fb).stored
    again = store.record(fb)
    assert again.duplicate and not again.stored
    assert store.count() == 1


def test_later_feedback_merges_monotonically(store: FeedbackStore) -> None:
    store.record(Feedback("x1", "C1", sent=True, sent_at=SENT, opened_at=SENT + timedelta(hours=3)))
    store.record(Feedback("x1", "C1", sent=True, sent_at=SENT, opened_at=SENT + timedelta(hours=1), clicked=True,
                          converted=True, revenue=40.0))  # fmt: skip
    result = store.record(Feedback("x1", "C1", sent=True, opened=True, converted=True, revenue=25.0))
    assert result.duplicate and not result.stored  # nothing new: a lower revenue, no flag turned off
    row = _rows(store.engine)["x1"]
    assert (row["sent"], row["opened"], row["clicked"], row["converted"]) == (True, True, True, True)
    assert row["revenue"] == 40.0
    assert row["opened_at"] == SENT + timedelta(hours=1) and row["sent_at"] == SENT
    assert row["updated_at"] > row["received_at"]
    assert (row["offer_id"], row["propensity"], row["request_id"], row["channel"]) == ("OFF10", 0.25, "r1", "email")


def test_record_is_durable_a_new_engine_sees_it(store: FeedbackStore, db_path: Path) -> None:
    store.record(Feedback("x2", "C2", sent=True, sent_at=SENT, opened=True))
    fresh = sa.create_engine(f"sqlite:///{db_path}")
    with fresh.connect() as con:
        assert con.execute(sa.select(feedback.c.opened).where(feedback.c.exposure_id == "x2")).scalar_one() is True


def test_feedback_for_a_decision_still_pending_in_the_log(db_path: Path) -> None:
    engine = create_serving_engine(f"sqlite:///{db_path}")
    dlog = DecisionLog(engine)
    dlog.append(_decision(1))  # not flushed
    assert FeedbackStore(engine, dlog).record(Feedback("x1", "C1", sent=True, sent_at=SENT)).stored


@pytest.mark.parametrize(
    ("fb", "error"),
    [
        (Feedback("x999", "C1", sent=True), UnknownExposure),
        (Feedback("x1", "C2", sent=True), FeedbackConflict),  # x1 belongs to C1
        (Feedback("x1", "C1", sent=True, channel="sms"), FeedbackConflict),
        (Feedback("x1", "C1", sent=True, offer_id="SHIP"), FeedbackConflict),
        (Feedback("x1", "C1", sent=False, converted=True), FeedbackInvalid),
        (Feedback("x1", "C1", sent=False, opened_at=SENT), FeedbackInvalid),
        (Feedback("x1", "C1", sent=True, converted=True, revenue=-1.0), FeedbackInvalid),
        (Feedback("x1", "C1", sent=True, revenue=10.0), FeedbackInvalid),  # revenue without conversion
        (Feedback("x1", "C1", sent=True, sent_at=SENT, opened_at=SENT - timedelta(hours=1)), FeedbackInvalid),
    ],
    ids=["unknown-exposure", "customer-mismatch", "channel-mismatch", "offer-mismatch", "converted-not-sent",
         "opened-not-sent", "negative-revenue", "revenue-not-converted", "opened-before-sent"],  # fmt: skip
)
def test_bad_feedback_raises_the_named_error_and_stores_nothing(store: FeedbackStore, fb: Feedback, error) -> None:
    with pytest.raises(error):
        store.record(fb)
    assert store.count() == 0


def test_unwritable_database_is_store_unavailable(store: FeedbackStore) -> None:
    feedback.drop(store.engine)
    with pytest.raises(StoreUnavailable):
        store.record(Feedback("x1", "C1", sent=True))


def test_recent_sends_lists_sent_messages_since(store: FeedbackStore) -> None:
    store.record(Feedback("x1", "C1", sent=True, sent_at=SENT))
    store.record(Feedback("x8", "C1", sent=True, sent_at=SENT - timedelta(days=10)))
    store.record(Feedback("x15", "C1", sent=False))  # not sent: no contact
    store.record(Feedback("x2", "C2", sent=True, sent_at=SENT + timedelta(hours=2)))
    store.record(Feedback("x22", "C1", sent=True, sent_at=SENT - timedelta(days=1)))
    since = SENT - timedelta(days=7)
    sends = store.recent_sends(["C1", "C2", "C3"], since=since)
    assert sends == {"C1": [SENT - timedelta(days=1), SENT], "C2": [SENT + timedelta(hours=2)], "C3": []}
    # One customer (a single recommendation) takes its own statement: the same rows, oldest first.
    assert store.recent_sends(["C1"], since=since) == {"C1": sends["C1"]}
    assert store.recent_sends(["C3"], since=since) == {"C3": []}


def test_recent_sends_see_feedback_recorded_after_an_earlier_read(store: FeedbackStore) -> None:
    since = SENT - timedelta(days=7)
    assert store.recent_sends(["C1"], since) == {"C1": []}  # opens the kept read connection
    store.record(Feedback("x1", "C1", sent=True, sent_at=SENT))
    assert store.recent_sends(["C1"], since) == {"C1": [SENT]}  # no snapshot held from the first read
    store.close()
    assert store.recent_sends(["C1"], since) == {"C1": [SENT]}  # closed: the next read opens another


def test_recent_sends_survive_the_server_dropping_their_connection(pg_url: str) -> None:
    engine = create_serving_engine(pg_url)
    store = FeedbackStore(engine, _log_decisions(engine))
    store.record(Feedback("x1", "C1", sent=True, sent_at=SENT))
    since = SENT - timedelta(days=7)
    assert store.recent_sends(["C1"], since) == {"C1": [SENT]}
    pid = store._reader.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    with engine.connect() as admin:  # what a server restart or an idle timeout does to a kept connection
        assert admin.exec_driver_sql(f"SELECT pg_terminate_backend({pid})").scalar_one()
    assert store.recent_sends(["C1"], since) == {"C1": [SENT]}
    assert store._reader.exec_driver_sql("SELECT pg_backend_pid()").scalar_one() != pid
    store.close()
    engine.dispose()


def test_recent_sends_from_an_unreachable_database_are_store_unavailable(tmp_path: Path) -> None:
    engine = create_serving_engine("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=1", create=False)
    with pytest.raises(StoreUnavailable):
        FeedbackStore(engine).recent_sends(["C1"], SENT)


# --- concurrency -------------------------------------------------------------------------------


def _plan(seed: int, n: int) -> list[Feedback]:
    """n random cumulative feedbacks over overlapping exposures."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        i = rng.randrange(N_EXPOSURES)
        sent = rng.random() < 0.8
        opened, clicked, converted = (sent and rng.random() < 0.5 for _ in range(3))
        revenue = round(rng.uniform(1, 100), 2) if converted else 0.0
        out.append(Feedback(f"x{i}", f"C{i % 7}", sent=sent, sent_at=SENT if sent else None,
                            opened=opened, clicked=clicked, converted=converted, revenue=revenue))  # fmt: skip
    return out


def _write_all(store: FeedbackStore, plan: list[Feedback]) -> list[Feedback]:
    """Write the plan; return the feedbacks whose write was acknowledged."""
    acked = []
    for fb in plan:
        try:
            store.record(fb)
        except StoreUnavailable:
            continue
        acked.append(fb)
    return acked


def _process_worker(url: str, seed: int, n: int) -> list[Feedback]:
    engine = create_serving_engine(url)
    try:
        return _write_all(FeedbackStore(engine, None), _plan(seed, n))
    finally:
        engine.dispose()


def _assert_merged(engine: sa.Engine, acked: list[Feedback]) -> None:
    expected: dict[str, dict] = {}
    for fb in acked:
        e = expected.setdefault(fb.exposure_id, {"sent": False, "opened": False, "clicked": False,
                                                 "converted": False, "revenue": 0.0})  # fmt: skip
        for flag in ("sent", "opened", "clicked", "converted"):
            e[flag] = e[flag] or getattr(fb, flag)
        e["revenue"] = max(e["revenue"], fb.revenue)
    rows = _rows(engine)
    assert len(rows) == len(expected)
    with engine.connect() as con:
        assert con.execute(sa.select(sa.func.count()).select_from(feedback)).scalar_one() == len(expected)
    for exposure_id, e in expected.items():
        got = rows[exposure_id]
        assert {k: got[k] for k in e} == e, exposure_id


def _run_threads(engine: sa.Engine, threads: int = 16, per_thread: int = 50) -> list[Feedback]:
    """16 threads x 50 writes through one store; returns the acknowledged feedbacks (all of them)."""
    store = FeedbackStore(engine, None)
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(lambda seed: _write_all(store, _plan(seed, per_thread)), range(threads)))
    acked = [fb for r in results for fb in r]
    assert len(acked) == threads * per_thread  # every write was acknowledged
    return acked


def _run_processes(url: str, processes: int = 4, per_process: int = 50) -> list[Feedback]:
    """4 processes x 50 writes, each with its own engine; returns the acknowledged feedbacks."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes) as pool:
        results = pool.starmap(_process_worker, [(url, 100 + p, per_process) for p in range(processes)])
    acked = [fb for r in results for fb in r]
    assert len(acked) == processes * per_process
    return acked


def test_concurrent_threads_store_each_exposure_once_with_merged_flags(db_path: Path) -> None:
    engine = create_serving_engine(f"sqlite:///{db_path}")
    _log_decisions(engine)
    _assert_merged(engine, _run_threads(engine))


def test_concurrent_processes_store_each_exposure_once_with_merged_flags(db_path: Path) -> None:
    url = f"sqlite:///{db_path}"
    engine = create_serving_engine(url)
    _log_decisions(engine)
    _assert_merged(engine, _run_processes(url))


# --- PostgreSQL ----------------------------------------------------------------------------


@pytest.mark.needs_service
def test_postgres_concurrent_upserts_store_each_exposure_once(pg_url: str) -> None:
    engine = create_serving_engine(pg_url)
    assert engine.dialect.name == "postgresql"
    _log_decisions(engine)
    acked = _run_threads(engine)
    _assert_merged(engine, acked)
    acked += _run_processes(pg_url)  # the same exposures again from other processes: still one row each
    _assert_merged(engine, acked)
