"""Point-in-time snapshots: hand-checked values, no leakage from T onwards, segments, atomic writes."""

from __future__ import annotations

import itertools
import math
from datetime import UTC, datetime

import duckdb
import pandas as pd
import pytest

from engage.config import SegmentConfig
from features import snapshots
from features.segments import segment_of, segment_sql
from features.snapshots import SnapshotError, snapshot_dir
from tests.factories import CUSTOMERS, EVENTS, EXPOSURES, write_contract
from tests.helpers import build, frame, load

T = datetime(2025, 6, 1, tzinfo=UTC)


@pytest.fixture
def home(tmp_path):
    home = tmp_path / "home"
    load(write_contract(tmp_path / "src"), home)
    return home


def test_snapshot_values_match_hand_computed(home):
    df = frame(build(home, [T])[0])

    assert list(df.index) == ["C1", "C2"]  # C3 signed up after T: it does not exist yet
    c1, c2 = df.loc["C1"], df.loc["C2"]
    assert c1.orders_90d == 2 and c1.revenue_90d == pytest.approx(100.0)
    assert c1.days_since_last_purchase == pytest.approx(6 + 11 / 24)  # May 25 13:00 -> Jun 1 00:00
    assert c1.avg_order_value_365d == pytest.approx(50.0)
    assert c1.email_hour_shares[19] == pytest.approx(1.0)  # 23:30 UTC is 19:30 in New York (EDT)
    assert c1.email_hour_shares.sum() == pytest.approx(1.0) and len(c1.email_hour_shares) == 24
    assert c2.in_app_hour_shares[10] == pytest.approx(1.0)  # 01:00 UTC is 10:00 in Tokyo
    assert c1.utc_offset_hours == -4 and c2.utc_offset_hours == 9
    assert (c1.email_consent, c1.sms_consent, c1.push_consent) == (True, False, False)
    assert c1.offers_discount_sent_365d == 1 and c1.offers_discount_redeemed_365d == 1
    assert c2.control_messages_365d == 1 and c2.offers_other_sent_365d == 0
    assert c2.message_open_rate_365d == 0  # opened on Jun 2, after T
    assert c2.complaints_30d == 1 and c2.days_since_last_complaint == pytest.approx(22 / 24)
    assert c2.segment == "new" and c1.segment == "potential"
    assert c1.attr_age_band == "25-34" and c1.attr_household_size == 2
    assert c1.email_opens_trend == pytest.approx(1.0)  # 1 open in 30 days, none in the 60 before
    history = 30 + 11 / 24  # first event May 1 13:00
    assert c1.history_days == pytest.approx(history)
    assert c1.orders_per_30d_365d == pytest.approx(30 * 2 / history)
    assert c1.purchase_gap_ratio == pytest.approx((6 + 11 / 24) * 2 / history)
    assert c1.orders_decayed_60d == pytest.approx(math.exp(-history / 60) + math.exp(-(6 + 11 / 24) / 60))
    assert pd.isna(c1.days_since_last_session) and pd.isna(c1.days_since_last_support_contact)
    assert c2.days_since_last_session == pytest.approx(1 + 23 / 24)
    assert c2.sessions_per_30d_365d == pytest.approx(30 / (1 + 23 / 24))
    assert c2.sessions_30d_vs_365d == pytest.approx(1.0)
    assert c2.days_since_last_support_contact == pytest.approx(22 / 24)  # the complaint by phone
    assert (c1.offer_sends_matured_365d, c1.offer_conversions_365d, c1.control_sends_matured_365d) == (1, 1, 0)
    assert c1.redemption_share_365d == pytest.approx(0.5)
    assert c1.offer_uplift_365d == pytest.approx(1.1 / 2 - 0.1)
    assert c2.control_sends_matured_365d == 0  # sent 12 hours before T: its conversion is not known yet
    assert (c1.email_sent_by_hour[8], c1.email_opened_by_hour[8]) == (1, 1)  # 12:00 UTC is 08:00 in New York
    assert c1.email_sent_by_hour.sum() == 1 and c2.push_sent_by_hour.sum() == 0
    assert list(c2.sms_hour_shares) == [0.0] * 24  # no sms engagement: all zero, not missing


def test_no_feature_sees_rows_at_or_after_t(home, tmp_path):
    before = frame(build(home, [T])[0])

    # Plant rows exactly at T and just after it, for every kind of input a feature reads.
    at_t, later = "2025-06-01T00:00:00Z", "2025-06-01T01:00:00Z"
    planted = pd.DataFrame(
        [
            ("f1", "C1", at_t, "purchase", "web", "500", "OFF10"),
            ("f2", "C1", later, "email_open", "email", "", ""),
            ("f3", "C2", at_t, "complaint", "phone", "", ""),
            ("f4", "C2", later, "unsubscribe", "", "", ""),
            ("f5", "C2", at_t, "session", "in_app", "", ""),
            ("f6", "C1", later, "support_ticket", "phone", "", ""),
        ],
        columns=EVENTS.columns,
    )
    exposures = pd.DataFrame(
        [("x9", "C1", at_t, "email", "OFF10", "0.5", later, "true", "true", "500")], columns=EXPOSURES.columns
    )
    load(write_contract(tmp_path / "future", events=planted, exposures=exposures, offers=None), home)

    after = frame(build(home, [T])[0])
    pd.testing.assert_frame_equal(before, after)
    # The planted rows do count once the snapshot time passes them, so the check above can fail.
    moved = frame(build(home, [datetime(2025, 6, 1, 2, tzinfo=UTC)])[0])
    assert moved.loc["C1", "orders_lifetime"] == before.loc["C1", "orders_lifetime"] + 1
    assert bool(moved.loc["C2", "email_consent"]) is False


def test_default_as_of_is_just_after_last_event(home):
    (result,) = build(home)
    assert result.as_of == datetime(2025, 7, 2, 10, 0, 1, tzinfo=UTC)
    assert frame(result).loc["C3", "orders_lifetime"] == 1  # the last event itself is inside


def test_as_of_before_first_signup_is_refused(home):
    with pytest.raises(SnapshotError, match="no customer exists yet"):
        build(home, [datetime(2020, 1, 1, tzinfo=UTC)])


@pytest.mark.parametrize("bad", ["yesterday-ish", "2025-13-01", ""])
def test_unparsable_as_of_is_refused(bad):
    with pytest.raises(SnapshotError, match="not a timestamp"):
        snapshots.to_utc(bad)


def test_as_of_with_offset_is_converted_to_utc():
    assert snapshots.to_utc("2025-06-01T02:00:00+02:00") == T


def test_failed_build_leaves_no_file(home, monkeypatch):
    monkeypatch.setattr(snapshots, "snapshot_sql", lambda *a, **k: "SELECT nonsense FROM nowhere")
    with pytest.raises(duckdb.Error):
        build(home, [T])
    assert list(snapshot_dir(home).iterdir()) == []


def test_empty_warehouse_says_to_ingest(tmp_path):
    home = tmp_path / "empty"
    load(write_contract(tmp_path / "src", customers=CUSTOMERS.head(1), events=EVENTS.head(0),
                        offers=None, exposures=None), home)
    with pytest.raises(SnapshotError, match="engage ingest"):
        build(home)


@pytest.mark.parametrize(
    ("tenure", "recency", "orders", "spend_pct", "expected"),
    [
        (10, 2, 9, 0.99, "new"),
        (400, 5, 6, 0.9, "high_value"),
        (400, 5, 6, 0.5, "potential"),  # frequent but not top spend
        (400, 5, 4, 0.95, "potential"),  # top spend but too few orders
        (400, 90, 3, 0.5, "at_risk"),
        (400, 90, 1, 0.5, "potential"),  # a one-time buyer is not "at risk" of a habit
        (400, 200, 3, 0.5, "dormant"),
        (400, None, 0, 0.0, "dormant"),  # never bought in over a year
        (60, None, 0, 0.0, "potential"),
    ],
)
def test_segment_rules(tenure, recency, orders, spend_pct, expected):
    cfg = SegmentConfig()
    got = segment_of(cfg, tenure_days=tenure, days_since_last_purchase=recency, orders_365d=orders,
                     spend_percentile_365d=spend_pct)
    assert got == expected


def test_segment_sql_agrees_with_python():
    cfg = SegmentConfig()
    grid = list(itertools.product([5, 29, 30, 100, 400], [None, 1, 29, 30, 59, 60, 179, 180, 500],
                                  [0, 1, 2, 5], [0.0, 0.79, 0.8, 1.0]))
    df = pd.DataFrame(grid, columns=["tenure_days", "days_since_last_purchase", "orders_365d",
                                     "spend_percentile_365d"])
    con = duckdb.connect()
    con.register("g", df)
    got = con.execute(f"SELECT {segment_sql(cfg)} FROM g").fetchnumpy()
    sql_segments = list(next(iter(got.values())))
    py_segments = [
        segment_of(cfg, tenure_days=t, days_since_last_purchase=None if pd.isna(r) else r, orders_365d=o,
                   spend_percentile_365d=s)
        for t, r, o, s in grid
    ]
    assert sql_segments == py_segments
