"""The decision log: non-blocking append, batched flushes, retry while the database is down, lookup."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from serving.decision_log import DecisionLog, decision_record
from serving.servingdb import create_serving_engine, decisions, metadata, serving_db_url
from serving.types import ChannelScore, Decision, OfferScore, Suppression

DECIDED = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def _record(i: int, exposure: bool = True) -> dict:
    return {
        "request_id": f"r{i}",
        "exposure_id": f"x{i}" if exposure else None,
        "customer_id": f"C{i}",
        "decided_at": DECIDED.isoformat(),
        "source": "api",
        "action": "retain" if exposure else "none",
        "chosen_offer": "OFF10" if i % 2 else None,
        "channel": "email",
        "propensity": 0.5,
        "cold_start": False,
        "degraded": False,
    }


def _stored(engine: sa.Engine) -> int:
    with engine.connect() as con:
        return con.execute(sa.select(sa.func.count()).select_from(decisions)).scalar_one()


@pytest.fixture
def db(tmp_path: Path) -> tuple[sa.Engine, Path]:
    path = tmp_path / "serving" / "serving.db"
    return create_serving_engine(f"sqlite:///{path}"), path


def test_default_url_is_a_wal_sqlite_file_under_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ENGAGE_SERVING_DB_URL", raising=False)
    engine = create_serving_engine(home=tmp_path / "home")
    assert (tmp_path / "home" / "serving" / "serving.db").exists()
    with engine.connect() as con:
        assert con.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert con.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert con.exec_driver_sql("PRAGMA busy_timeout").scalar() > 0
    monkeypatch.setenv("ENGAGE_SERVING_DB_URL", "sqlite:///elsewhere.db")
    assert serving_db_url(tmp_path) == "sqlite:///elsewhere.db"


def test_decision_record_is_json_safe_and_complete() -> None:
    decision = Decision(
        customer_id="C1", action="retain", reason=None, churn_probability=np.float32(0.7), risk_tier="high",
        segment="at_risk", reasons=["days_since_last_purchase"],
        offers=[OfferScore("OFF10", np.float64(0.2), 0.1, 0.1, np.float64(3.5), 3.5)],
        chosen_offer="OFF10", channel="email", send_at=DECIDED, send_at_local=DECIDED, expected_open_rate=0.3,
        propensity=np.float64(0.8), channels=[ChannelScore("email", True, 19, 0.3)],
        suppressions=[Suppression("consent", "channel:sms", "no SMS consent")], cold_start=False, degraded=False,
        feature_timestamp=DECIDED, model_versions={"churn": "3"},
    )  # fmt: skip
    record = decision_record(decision, "r1", "x1", DECIDED, "api")
    json.dumps(record)  # raises on numpy scalars or datetimes
    assert record["propensity"] == pytest.approx(0.8) and type(record["propensity"]) is float
    assert record["decided_at"] == DECIDED.isoformat() and record["send_at"] == DECIDED.isoformat()
    assert record["payload"]["offers"][0]["offer_id"] == "OFF10"
    assert record["payload"]["suppressions"][0]["rule"] == "consent"
    assert record["payload"]["channels"][0]["best_local_hour"] == 19
    # every field of each part, in field order, numpy scalars as plain floats
    for key, parts in (("offers", decision.offers), ("channels", decision.channels),
                       ("suppressions", decision.suppressions)):
        assert [list(d) for d in record["payload"][key]] == [[f.name for f in dataclasses.fields(p)] for p in parts]
    assert record["payload"]["offers"][0]["p_convert_with"] == 0.2
    assert type(record["payload"]["offers"][0]["expected_incremental_profit"]) is float


def test_flush_stores_records_and_lookup_sees_pending_and_flushed(db) -> None:
    engine, _ = db
    dlog = DecisionLog(engine)
    dlog.append(_record(1))
    dlog.append(_record(2, exposure=False))
    pending = dlog.lookup("x1")
    assert pending is not None and pending.customer_id == "C1" and pending.decided_at == DECIDED
    assert _stored(engine) == 0
    assert dlog.flush() == 2
    assert _stored(engine) == 2 and dlog.stats.pending == 0
    flushed = DecisionLog(engine).lookup("x1")  # a fresh log: from the table
    assert flushed == pending
    assert dlog.lookup("nope") is None


def test_lookup_waits_for_a_decision_another_worker_has_not_flushed_yet(db) -> None:
    engine, _ = db
    worker_a = DecisionLog(engine, flush_interval_s=60)  # flushes only when told
    worker_b = DecisionLog(engine)
    worker_a.append(_record(1))
    assert worker_b.lookup("x1", grace_s=0) is None  # only in worker A's buffer
    flusher = threading.Timer(0.3, worker_a.flush)
    flusher.start()
    found = worker_b.lookup("x1", grace_s=30)  # found once A flushes, well before the grace ends
    flusher.join()
    assert found is not None and found.customer_id == "C1"


def test_close_flushes_what_is_pending_and_is_idempotent(db) -> None:
    engine, _ = db
    dlog = DecisionLog(engine, flush_interval_s=60).start()  # the thread would not tick in this test
    for i in range(100):
        dlog.append(_record(i))
    dlog.close()
    dlog.close()
    assert _stored(engine) == 100
    assert dlog.stats.flushed == 100 and dlog.stats.pending == 0


def test_background_thread_flushes(db) -> None:
    engine, _ = db
    dlog = DecisionLog(engine, flush_interval_s=0.05).start()
    for i in range(10):
        dlog.append(_record(i))
    deadline = time.monotonic() + 5
    while dlog.stats.flushed < 10 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _stored(engine) == 10
    dlog.close()


def test_append_does_not_block_while_the_database_is_locked(db) -> None:
    engine, path = db
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # holds the write lock
    locker.execute("INSERT INTO decisions (decision_id, request_id, customer_id, decided_at, source, action, "
                   "cold_start, degraded) VALUES ('held', 'r', 'C', '2025-06-01 00:00:00', 'api', 'none', 0, 0)")
    dlog = DecisionLog(engine, flush_interval_s=0.01).start()
    try:
        time.sleep(0.1)  # let the writer block on the lock
        for i in range(2000):  # the lock is held by this thread's other connection until the loop is done
            dlog.append(_record(i))
        assert dlog.stats.pending == 2000 and _stored(engine) == 0
    finally:
        locker.execute("COMMIT")
        locker.close()
    dlog.flush()
    assert _stored(engine) == 2001
    assert dlog.stats.flushed == 2000 and dlog.stats.dropped == 0
    dlog.close()


def test_database_unreachable_keeps_records_and_retries(db) -> None:
    engine, _ = db
    decisions.drop(engine)  # every write fails now
    dlog = DecisionLog(engine)
    for i in range(5):
        dlog.append(_record(i))
    assert dlog.flush() == 0
    stats = dlog.stats
    assert stats.pending == 5 and stats.flush_errors == 1 and stats.dropped == 0
    assert "OperationalError" in stats.last_error and "C1" not in stats.last_error  # no customer data
    assert dlog.lookup("x3") is not None  # still answerable from the buffer
    metadata.create_all(engine)  # the database is back
    assert dlog.flush() == 5
    assert _stored(engine) == 5 and dlog.stats.pending == 0


def test_overflow_drops_the_oldest_and_counts_them(db) -> None:
    engine, _ = db
    dlog = DecisionLog(engine, max_pending=10)
    for i in range(15):
        dlog.append(_record(i))
    assert dlog.stats.dropped == 5 and dlog.stats.pending == 10
    assert dlog.lookup("x4") is None and dlog.lookup("x5") is not None
    dlog.flush()
    with engine.connect() as con:
        ids = sorted(con.execute(sa.select(decisions.c.exposure_id)).scalars(), key=lambda x: int(x[1:]))
    assert ids == [f"x{i}" for i in range(5, 15)]


def test_a_record_the_database_refuses_is_dropped_alone(db) -> None:
    engine, _ = db
    dlog = DecisionLog(engine)
    dlog.append(_record(1))
    dlog.append(_record(2) | {"payload": {"not json": object()}})
    dlog.append(_record(3))
    assert dlog.flush() == 2
    assert _stored(engine) == 2 and dlog.stats.dropped == 1 and dlog.stats.pending == 0


def test_flushing_twice_stores_each_record_once(db) -> None:
    engine, _ = db
    dlog = DecisionLog(engine)
    records = [_record(i) | {"decision_id": f"d{i}"} for i in range(3)]
    for r in records:
        dlog.append(r)
    dlog.flush()
    for r in records:  # e.g. a retry after a commit whose acknowledgement was lost
        dlog.append(r)
    dlog.flush()
    assert _stored(engine) == 3


# -- bulk_insert: the batch job's bulk path ---------------------------------------------------


def _bulk_columns(ids: list[int]) -> dict[str, list]:
    versions = {"churn": "3"}  # one object for every row, as the batch job passes it
    return {
        "decision_id": [f"d{i}" for i in ids],
        "request_id": ["batch-1"] * len(ids),
        "exposure_id": [f"x{i}" if i % 3 else None for i in ids],
        "customer_id": [f"C{i}" for i in ids],
        "decided_at": [DECIDED] * len(ids),
        "source": ["batch"] * len(ids),
        "action": ["retain" if i % 3 else "none" for i in ids],
        # Text COPY must carry as is: quotes, commas, a line break, an empty string (not NULL), non-ASCII.
        "reason": [(None, "holdout", "", 'say "no", then\nleave', "café \\N")[i % 5] for i in ids],
        "chosen_offer": ["OFF10" if i % 2 else None for i in ids],
        "channel": ["email"] * len(ids),
        # Aware, naive (= UTC) and ISO 8601 text, as UTCDateTime binds them.
        "send_at": [(datetime(2025, 6, 2, i % 24, tzinfo=UTC), datetime(2025, 6, 2, 5, 30, 0, 250),
                     "2025-06-02T05:00:00+02:00", None)[i % 4] for i in ids],
        "propensity": [None if i == 7 else 0.25 * (i % 4) + 1e-17 * i for i in ids],
        "cold_start": [False] * len(ids),
        "degraded": [False] * len(ids),
        "holdout": [i % 3 == 0 for i in ids],
        "feature_timestamp": [DECIDED] * len(ids),
        "model_versions": [versions] * len(ids),
        "payload": [{"rank": i, "reasons": ["days_since_last_purchase"], "offers": []} for i in ids],
    }


def _rows(engine: sa.Engine) -> list[dict]:
    with engine.connect() as con:
        return [dict(r._mapping) for r in con.execute(sa.select(decisions).order_by(decisions.c.decision_id))]


def _bulk_matches_orm_path(url_a: str, url_b: str) -> None:
    """Rows stored by the bulk path read back exactly as rows stored by SQLAlchemy's own executemany."""
    from serving.servingdb import bulk_insert, upsert

    bulk, plain = create_serving_engine(url_a), create_serving_engine(url_b)
    cols = _bulk_columns(list(range(12)))
    # Two chunks, with the payloads already JSON text (as batch lists give them).
    text = [json.dumps(p) for p in cols["payload"]]
    first = {k: v[:5] for k, v in cols.items()} | {"payload": text[:5]}
    second = {k: v[5:] for k, v in cols.items()} | {"payload": text[5:]}
    seen: list[int] = []
    with pytest.raises(ValueError, match="no values for column"):  # a bad first chunk: nothing is written
        bulk_insert(bulk, decisions, [{k: v for k, v in first.items() if k != "payload"}])
    with pytest.raises(sa.exc.IntegrityError):  # the second chunk is refused: the first is rolled back with it
        bulk_insert(bulk, decisions, [first, second | {"action": [None] * 7}], encoded=("payload",))
    assert _rows(bulk) == []
    assert bulk_insert(bulk, decisions, [first, second], encoded=("payload",), on_chunk=seen.append) == 12
    assert seen == [5, 7]
    records = [dict(zip(cols, values, strict=True)) for values in zip(*cols.values(), strict=True)]
    with plain.begin() as con:
        con.execute(upsert(plain, decisions).on_conflict_do_nothing(), records)
    stored = _rows(bulk)
    assert stored == _rows(plain) and len(stored) == 12
    by_id = {r["decision_id"]: r for r in stored}
    assert by_id["d1"]["decided_at"] == DECIDED and by_id["d1"]["payload"]["rank"] == 1
    assert by_id["d1"]["model_versions"] == {"churn": "3"} and by_id["d1"]["holdout"] is False
    assert by_id["d3"]["holdout"] is True and by_id["d3"]["exposure_id"] is None
    assert by_id["d2"]["reason"] == "" and by_id["d3"]["reason"] == 'say "no", then\nleave'
    assert by_id["d2"]["send_at"] == datetime(2025, 6, 2, 3, tzinfo=UTC) and by_id["d3"]["send_at"] is None
    # Existing keys are skipped (a re-run of a batch job), new ones added.
    bulk_insert(bulk, decisions, [_bulk_columns(list(range(8, 16)))])
    assert len(_rows(bulk)) == 16
    with pytest.raises(ValueError, match="no values for column"):
        bulk_insert(bulk, decisions, [{k: v for k, v in cols.items() if k != "payload"}])
    with pytest.raises(ValueError, match="has 11 values"):
        bulk_insert(bulk, decisions, [{**cols, "source": ["batch"] * 11}])
    assert len(_rows(bulk)) == 16  # refused before writing


def _arrow_matches_lists(url_a: str, url_b: str) -> None:
    """Rows given to the bulk path as an Arrow table (JSON columns as text) read back as the same rows given as
    column lists of Python objects."""
    import pyarrow as pa

    from serving.servingdb import bulk_insert

    arrow, lists = create_serving_engine(url_a), create_serving_engine(url_b)
    cols = _bulk_columns(list(range(20)))
    cols["send_at"] = [datetime(2025, 6, 2, i % 3, tzinfo=UTC) if i % 4 else None for i in range(20)]
    table = pa.table({**cols, "model_versions": [json.dumps(v) for v in cols["model_versions"]],
                      "payload": [json.dumps(p) for p in cols["payload"]]})
    seen: list[int] = []
    assert bulk_insert(arrow, decisions, [table.slice(0, 8), table.slice(8)], encoded=("model_versions", "payload"),
                       on_chunk=seen.append) == 20
    assert seen == [8, 12]
    bulk_insert(lists, decisions, [cols])
    assert _rows(arrow) == _rows(lists) and len(_rows(arrow)) == 20
    with pytest.raises(ValueError, match=r"no values for column\(s\) payload"):
        bulk_insert(arrow, decisions, [table.drop_columns(["payload"])], encoded=("model_versions", "payload"))
    with pytest.raises(ValueError, match="JSON text: name model_versions in encoded"):
        bulk_insert(arrow, decisions, [table], encoded=("payload",))
    with pytest.raises(ValueError, match="column propensity"):
        bulk_insert(arrow, decisions, [table.set_column(11, "propensity", pa.array(["high"] * 20))],
                    encoded=("model_versions", "payload"))
    assert len(_rows(arrow)) == 20


def test_bulk_insert_sqlite_matches_orm_path(tmp_path: Path) -> None:
    _bulk_matches_orm_path(f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}")


def test_bulk_insert_of_arrow_tables_sqlite(tmp_path: Path) -> None:
    _arrow_matches_lists(f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}")


def _in_two_schemas(pg_url: str, check) -> None:
    """``check(url_a, url_b)`` on two fresh schemas of the test database."""
    admin = sa.create_engine(pg_url)
    names = [f"engage_bulk_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    with admin.begin() as con:
        for name in names:
            con.exec_driver_sql(f'CREATE SCHEMA "{name}"')
    try:
        check(*(pg_url.rsplit("search_path%3D", 1)[0] + f"search_path%3D{name}" for name in names))
    finally:
        with admin.begin() as con:
            for name in names:
                con.exec_driver_sql(f'DROP SCHEMA "{name}" CASCADE')
        admin.dispose()


@pytest.mark.needs_service
def test_bulk_insert_postgres_matches_orm_path(pg_url: str) -> None:
    from serving.servingdb import CopyInserter

    assert CopyInserter.supports(decisions)  # so PostgreSQL's bulk path below is the COPY one
    _in_two_schemas(pg_url, _bulk_matches_orm_path)


@pytest.mark.needs_service
def test_bulk_insert_of_arrow_tables_postgres(pg_url: str) -> None:
    _in_two_schemas(pg_url, _arrow_matches_lists)


@pytest.mark.needs_service
def test_copy_refuses_a_value_of_the_wrong_type_and_stores_nothing(pg_url: str) -> None:
    from serving.servingdb import bulk_insert

    engine = create_serving_engine(pg_url)
    before = len(_rows(engine))
    bad = _bulk_columns([101, 102])
    bad["customer_id"] = ["C101", 102]
    with pytest.raises(ValueError, match="column customer_id of decisions"):
        bulk_insert(engine, decisions, [_bulk_columns([100]), bad])  # the first chunk is rolled back with it
    with pytest.raises(ValueError, match="column propensity"):
        bulk_insert(engine, decisions, [_bulk_columns([103]) | {"propensity": ["high"]}])
    assert len(_rows(engine)) == before
    assert bulk_insert(engine, decisions, [_bulk_columns([100, 101])]) == 2  # the connection is usable after
    assert len(_rows(engine)) == before + 2
