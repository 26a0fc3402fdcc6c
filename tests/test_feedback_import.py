"""Feedback into the warehouse through the real loader: exposures, derived events, idempotent re-import."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
from factories import write_contract

from features.load import ContractError, connect_warehouse, ingest
from serving.decision_log import DecisionLog
from serving.feedback import Feedback, FeedbackStore
from serving.feedback_import import import_feedback
from serving.servingdb import create_serving_engine

SENT = datetime(2025, 6, 5, 12, 0, tzinfo=UTC)
NOW = datetime(2025, 8, 1, tzinfo=UTC)
# exposure -> (customer, channel, offer); the factories' customers are C1, C2 (signed up 2025-05-20)
# and C3 (2025-07-01); C9 is not in the warehouse (a cold start).
EXPOSURES = {
    "f1": ("C1", "email", "OFF10"),
    "f2": ("C2", "push", None),
    "f3": ("C3", "sms", None),
    "f4": ("C1", "email", None),
    "f5": ("C9", "email", None),
    "f6": ("C1", "push", "SHIP"),
    "f7": ("C3", "email", None),
}


@pytest.fixture
def world(tmp_path: Path) -> tuple[Path, FeedbackStore]:
    home = tmp_path / "home"
    ingest(write_contract(tmp_path / "src"), home)
    engine = create_serving_engine(f"sqlite:///{tmp_path / 'serving.db'}")
    dlog = DecisionLog(engine)
    for i, (exposure_id, (customer, channel, offer)) in enumerate(EXPOSURES.items()):
        dlog.append({"request_id": f"r{i}", "exposure_id": exposure_id, "customer_id": customer,
                     "decided_at": SENT - timedelta(minutes=5), "source": "api", "action": "retain",
                     "chosen_offer": offer, "channel": channel, "propensity": 0.4,
                     "cold_start": False, "degraded": False})  # fmt: skip
    dlog.flush()
    store = FeedbackStore(engine, dlog)
    hour = timedelta(hours=1)
    store.record(Feedback("f1", "C1", sent=True, sent_at=SENT, opened_at=SENT + hour, clicked=True, converted=True,
                          revenue=42.0))  # fmt: skip
    store.record(Feedback("f2", "C2", sent=True, sent_at=SENT, opened_at=SENT + 2 * hour))
    store.record(Feedback("f3", "C3", sent=True, sent_at=SENT + timedelta(days=30), clicked=True))
    store.record(Feedback("f4", "C1", sent=False))  # never sent: not an exposure
    store.record(Feedback("f5", "C9", sent=True, sent_at=SENT))  # customer unknown to the warehouse
    store.record(Feedback("f6", "C1", sent=True, sent_at=NOW - timedelta(days=1)))  # too recent to be final
    return home, store


def _table(home: Path, sql: str) -> pd.DataFrame:
    with contextlib.closing(connect_warehouse(home, read_only=True)) as con:
        return con.execute(sql).df()


def test_loader_requires_a_customers_file(tmp_path: Path) -> None:
    """Why the import writes an empty customers file: the loader refuses a folder without one."""
    folder = write_contract(tmp_path / "src")
    (folder / "customers.csv").unlink()
    with pytest.raises(ContractError, match="customers.csv or customers.parquet is required"):
        ingest(folder, tmp_path / "home")


def test_import_writes_sent_settled_feedback_as_exposures_and_events(world) -> None:
    home, store = world
    customers_before = _table(home, "SELECT * EXCLUDE (loaded_at) FROM customers ORDER BY customer_id")
    report = import_feedback(home, store.engine, now=NOW)
    assert (report.candidates, report.not_settled, report.unknown_customer) == (5, 1, 1)
    assert (report.exposures_inserted, report.exposures_rejected) == (3, 0)
    assert (report.events_inserted, report.events_rejected) == (5, 0)

    exposures = _table(home, "SELECT * FROM exposures WHERE exposure_id LIKE 'f%' ORDER BY exposure_id")
    assert list(exposures["exposure_id"]) == ["f1", "f2", "f3"]
    f1 = exposures.iloc[0]
    assert (f1.customer_id, f1.channel, f1.offer_id, f1.propensity) == ("C1", "email", "OFF10", 0.4)
    assert (bool(f1.clicked), bool(f1.converted), f1.revenue) == (True, True, 42.0)
    assert f1.sent_at == pd.Timestamp("2025-06-05 12:00") and f1.opened_at == pd.Timestamp("2025-06-05 13:00")
    assert pd.isna(exposures.iloc[2].opened_at) and exposures.iloc[2].offer_id is None

    events = _table(home, "SELECT * FROM events WHERE event_id LIKE 'fb:%' ORDER BY event_id").set_index("event_id")
    assert list(events.index) == ["fb:f1:click", "fb:f1:open", "fb:f1:purchase", "fb:f2:open", "fb:f3:click"]
    assert events.loc["fb:f1:open", "event_type"] == "email_open"
    assert events.loc["fb:f2:open", "event_type"] == "push_open"
    assert events.loc["fb:f2:open", "event_at"] == pd.Timestamp("2025-06-05 14:00")
    assert events.loc["fb:f3:click", "event_type"] == "sms_click"
    purchase = events.loc["fb:f1:purchase"]
    assert (purchase.event_type, purchase.amount, purchase.offer_id) == ("purchase", 42.0, "OFF10")
    assert purchase.event_at == pd.Timestamp("2025-06-05 13:00")  # at the open
    customers_after = _table(home, "SELECT * EXCLUDE (loaded_at) FROM customers ORDER BY customer_id")
    pd.testing.assert_frame_equal(customers_before, customers_after)  # the empty customers file changed nothing


def test_reimport_adds_nothing(world) -> None:
    home, store = world
    import_feedback(home, store.engine, now=NOW)
    counts = "SELECT (SELECT count(*) FROM exposures), (SELECT count(*) FROM events), (SELECT count(*) FROM rejects)"
    before = _table(home, counts)
    report = import_feedback(home, store.engine, now=NOW)
    assert (report.exposures_inserted, report.events_inserted) == (0, 0)
    assert (report.exposures_already_loaded, report.events_already_loaded) == (3, 5)
    assert report.ingest is None  # nothing new: the loader is not even called
    pd.testing.assert_frame_equal(_table(home, counts), before)


def test_outcomes_after_import_are_stale_but_their_events_load(world) -> None:
    home, store = world
    import_feedback(home, store.engine, now=NOW)
    store.record(Feedback("f3", "C3", sent=True, clicked=True, converted=True, revenue=15.0))  # late conversion
    report = import_feedback(home, store.engine, now=NOW)
    assert report.stale == 1 and report.exposures_inserted == 0
    assert report.events_inserted == 1  # the purchase
    f3 = _table(home, "SELECT converted, revenue FROM exposures WHERE exposure_id = 'f3'").iloc[0]
    assert (bool(f3.converted), f3.revenue) == (False, 0.0)  # the loader keeps the first row it loaded
    assert len(_table(home, "SELECT * FROM events WHERE event_id = 'fb:f3:purchase'")) == 1


def test_settled_feedback_imports_later_and_cold_start_customers_once_loaded(world, tmp_path: Path) -> None:
    home, store = world
    import_feedback(home, store.engine, now=NOW)
    customers = pd.DataFrame({"customer_id": ["C9"], "signup_at": ["2025-01-01T00:00:00Z"]})
    events = pd.DataFrame(columns=["customer_id", "event_at", "event_type"])
    ingest(write_contract(tmp_path / "crm", customers=customers, events=events, offers=None, exposures=None), home)
    report = import_feedback(home, store.engine, now=NOW + timedelta(days=7))
    assert (report.exposures_inserted, report.not_settled, report.unknown_customer) == (2, 0, 0)  # f5 and f6


def test_a_rejected_exposure_is_not_offered_again(world) -> None:
    home, store = world
    store.record(Feedback("f7", "C3", sent=True, sent_at=SENT))  # C3 signed up on 2025-07-01: before signup
    first = import_feedback(home, store.engine, now=NOW)
    assert first.exposures_rejected == 1
    rejects = _table(home, "SELECT reason FROM rejects WHERE table_name = 'exposures'")
    assert len(rejects) == 1 and "before the customer's signup_at" in rejects.reason[0]
    second = import_feedback(home, store.engine, now=NOW)
    assert second.previously_rejected == 1 and second.exposures_rejected == 0
    assert len(_table(home, "SELECT * FROM rejects")) == 1


def test_nothing_to_import_leaves_the_warehouse_alone(tmp_path: Path) -> None:
    engine = create_serving_engine(f"sqlite:///{tmp_path / 'serving.db'}")
    report = import_feedback(tmp_path / "home", engine)
    assert report.candidates == 0 and report.ingest is None
    assert not (tmp_path / "home" / "warehouse.duckdb").exists()
