"""serving/online.py: the service's online read returns exactly what Feast's SDK returns (embedded store)."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from features.store import open_store, sample_customers
from serving.online import OnlineReader, OnlineRows, drop_stale
from serving.scoring import POLICY_FEATURES

SERVICES = ("churn", "next_best_offer", "send_time")


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


@pytest.mark.parametrize("path", ["one query", "per view"])
def test_online_read_equals_get_online_features(served, path):
    store = open_store(served.home)
    reader = OnlineReader(store, SERVICES, POLICY_FEATURES)
    assert type(reader._fast).__name__ == "_SqliteTablesReader"  # SQLite: every view in one query
    ids = [*sample_customers(served.home, 20), "C-never-seen"]
    rows = reader.read(ids) if path == "one query" else reader.read_per_view(ids)
    checked = set()
    for service in SERVICES:
        sdk = store.get_online_features(features=store.get_feature_service(service),
                                        entity_rows=[{"customer_id": c} for c in ids]).to_dict()
        for name, column in sdk.items():
            if name == "customer_id":
                continue
            assert all(_same(a, b) for a, b in zip(rows.values[name], column, strict=True)), name
            checked.add(name)
    assert len(checked) > 50 and checked <= set(reader.feature_names)
    assert all(rows.timestamps[:20]) and rows.timestamps[-1] is None
    assert all(column[-1] is None for column in rows.values.values())
    # each view's row time: every view has a row for a known customer, the newest is the customer's timestamp
    assert set(rows.view_timestamps) == set(reader.view_features) and len(reader.view_features) >= 5
    for i in range(len(ids)):
        times = [t[i] for t in rows.view_timestamps.values()]
        assert (all(times) and max(times) == rows.timestamps[i]) if i < 20 else not any(times)


def test_one_query_read_equals_the_per_view_read_for_repeats_one_customer_and_none(served):
    reader = OnlineReader(open_store(served.home), SERVICES, POLICY_FEATURES)
    known = sample_customers(served.home, 3)
    for ids in ([known[0]], [known[0], "C-never-seen", known[0], known[1]], []):
        fast, slow = reader.read(ids), reader.read_per_view(ids)
        assert fast.timestamps == slow.timestamps and fast.view_timestamps == slow.view_timestamps
        for name in reader.feature_names:
            assert all(_same(a, b) for a, b in zip(fast.values[name], slow.values[name], strict=True)), name


def _rows() -> OnlineRows:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    return OnlineRows(
        customer_ids=["A", "B", "C"],
        values={"orders": [3.0, 1.0, None], "segment": ["at_risk", "new", None], "hour": [5.0, 2.0, None]},
        timestamps=[t0 + timedelta(days=2), t0 + timedelta(days=2), None],
        view_timestamps={"customer_rfm": [t0, t0 + timedelta(days=2), None],
                         "customer_profile": [t0 + timedelta(days=2), t0 + timedelta(days=2), None]},
    )


FEATURES = {"customer_rfm": ["orders", "segment"], "customer_profile": ["hour"]}


def test_a_view_older_than_its_limit_is_treated_as_missing():
    rows = _rows()
    now = [datetime(2026, 1, 3, 12, tzinfo=UTC)] * 3
    fresh = drop_stale(rows, FEATURES, {"customer_rfm": 1.5 * 86400, "customer_profile": 5 * 86400}, now)
    # A's rfm row is 2.5 days old (limit 1.5): its features are dropped; B's is half a day old: kept
    assert fresh.stale == [["customer_rfm"], [], []]
    assert rows.values["orders"] == [None, 1.0, None] and rows.values["segment"] == [None, "new", None]
    assert rows.values["hour"] == [5.0, 2.0, None]
    # ages: the oldest row each answer used (A uses only its profile row); C is unknown
    assert fresh.ages == [0.5 * 86400, 0.5 * 86400, None]
    assert rows.timestamps[0] == datetime(2026, 1, 3, tzinfo=UTC)


def test_every_view_stale_keeps_the_customer_known_and_a_future_row_counts_as_new():
    rows = _rows()
    later, earlier = datetime(2026, 3, 1, tzinfo=UTC), datetime(2025, 12, 1, tzinfo=UTC)
    fresh = drop_stale(rows, FEATURES, {"customer_rfm": 86400, "customer_profile": 86400}, [later, earlier, later])
    assert fresh.stale[0] == ["customer_rfm", "customer_profile"] and fresh.ages[0] is None
    assert rows.values["orders"][0] is None and rows.values["hour"][0] is None
    assert rows.timestamps[0] == datetime(2026, 1, 3, tzinfo=UTC)  # still known: not a cold start
    # B asks as of a time before its rows were written: age 0, nothing dropped
    assert fresh.stale[1] == [] and fresh.ages[1] == 0.0 and rows.values["orders"][1] == 1.0


def test_views_without_a_limit_are_never_dropped():
    rows = _rows()
    fresh = drop_stale(rows, FEATURES, {}, [datetime(2030, 1, 1, tzinfo=UTC)] * 3)
    assert fresh.stale == [[], [], []] and rows.values["orders"] == [3.0, 1.0, None]
