"""Labels: churn over (T, T+H], exposures' opens within 24 hours at the local send hour."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime

import pandas as pd
import pytest

from features.labels import churn_labels, exposure_labels
from features.load import connect_warehouse
from features.snapshots import SnapshotError
from tests.factories import EVENTS, write_contract
from tests.helpers import load

T = datetime(2025, 6, 1, tzinfo=UTC)


@pytest.fixture
def con(tmp_path):
    home = tmp_path / "home"
    load(write_contract(tmp_path / "src"), home)
    with contextlib.closing(connect_warehouse(home, read_only=True)) as c:
        yield c


def test_churn_label_is_no_purchase_in_horizon(con):
    labels = churn_labels(con, [T], horizon_days=20).set_index("customer_id")
    assert list(labels.index) == ["C1", "C2"]  # C3 signed up after T
    assert not labels.loc["C1", "churned"]  # bought on Jun 10
    assert labels.loc["C2", "churned"]


def test_churn_label_ignores_events_before_t_and_after_horizon(con):
    # C1's next purchase after Jun 1 is Jun 10: outside a 5-day horizon, so C1 churned in it.
    labels = churn_labels(con, [T], horizon_days=5).set_index("customer_id")
    assert labels.loc["C1", "churned"]


def test_churn_label_on_activity(tmp_path):
    home = tmp_path / "home"
    extra = pd.DataFrame([("s1", "C2", "2025-06-05T10:00:00Z", "session", "web", "", "")], columns=EVENTS.columns)
    load(write_contract(tmp_path / "src", events=pd.concat([EVENTS, extra])), home)
    with contextlib.closing(connect_warehouse(home, read_only=True)) as c:
        by_purchase = churn_labels(c, [T], 20, on="purchase").set_index("customer_id")
        by_activity = churn_labels(c, [T], 20, on="activity").set_index("customer_id")
    assert by_purchase.loc["C2", "churned"] and not by_activity.loc["C2", "churned"]


def test_churn_label_beyond_data_is_refused(con):
    with pytest.raises(SnapshotError, match="not known yet"):
        churn_labels(con, [T], horizon_days=90)


@pytest.mark.parametrize(("horizon", "on"), [(0, "purchase"), (10, "visits")])
def test_churn_label_bad_arguments(con, horizon, on):
    with pytest.raises(ValueError):
        churn_labels(con, [T], horizon_days=horizon, on=on)


def test_exposure_labels(con):
    x = exposure_labels(con).set_index("exposure_id")
    assert bool(x.loc["x1", "opened_24h"]) and not bool(x.loc["x2", "opened_24h"])  # x2 opened 48h later
    assert x.loc["x1", "local_hour"] == 8  # 12:00 UTC in New York (EDT)
    assert x.loc["x2", "local_hour"] == 21  # 12:00 UTC in Tokyo
    assert bool(x.loc["x1", "converted"]) and x.loc["x1", "revenue"] == 60
    assert pd.isna(x.loc["x2", "offer_id"])
    assert len(exposure_labels(con, since=datetime(2025, 5, 25, tzinfo=UTC))) == 1
