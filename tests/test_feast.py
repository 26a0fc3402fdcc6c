"""Feast over the snapshots: historical point-in-time joins and online reads equal the DuckDB values."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from features import store as fstore
from features.catalog import FEATURE_SERVICES, all_views, model_columns
from features.list_features import expand_frame
from tests.factories import write_contract
from tests.helpers import build, load

T1 = datetime(2025, 6, 1, tzinfo=UTC)
T2 = datetime(2025, 6, 20, tzinfo=UTC)
PROFILE = {"age_band": "categorical", "household_size": "numeric"}


@pytest.fixture
def applied(tmp_path):
    """A store with two snapshots applied (not materialized)."""
    home = tmp_path / "home"
    load(write_contract(tmp_path / "src"), home)
    results = build(home, [T1, T2])
    store = fstore.open_store(home)
    fstore.apply(store, home, PROFILE, ttl_days=35)
    return home, store, results


def _service_features(service: str) -> list[str]:
    """The service's model columns (list features spread, as ``historical_features`` returns them)."""
    views = all_views(PROFILE)
    return model_columns(f.name for v in FEATURE_SERVICES[service] for f in views[v])


def _assert_same(actual: pd.DataFrame, expected: pd.DataFrame, columns: list[str]) -> None:
    for col in columns:
        a, e = actual[col], expected[col]
        if pd.api.types.is_numeric_dtype(e) and not pd.api.types.is_bool_dtype(e):
            np.testing.assert_allclose(a.astype(float), e.astype(float), equal_nan=True, err_msg=col)
        else:
            left = [None if pd.isna(x) else x for x in a]
            right = [None if pd.isna(x) else x for x in e]
            assert left == right, col


@pytest.mark.parametrize("service", sorted(FEATURE_SERVICES))
def test_historical_features_equal_duckdb_snapshots(applied, service):
    home, store, results = applied
    snaps = expand_frame(pd.concat([pd.read_parquet(r.path) for r in results], ignore_index=True))
    entity_df = snaps[["customer_id", "event_timestamp"]].copy()

    hist = fstore.historical_features(store, service, entity_df)

    key = ["customer_id", "event_timestamp"]
    hist = hist.sort_values(key).reset_index(drop=True)
    snaps = snaps.sort_values(key).reset_index(drop=True)
    assert len(hist) == len(snaps) == 4  # C1 and C2 at both times
    _assert_same(hist, snaps, _service_features(service))


def test_historical_lookup_between_snapshots_takes_the_earlier_one(applied):
    _, store, results = applied
    between = pd.DataFrame({"customer_id": ["C1"], "event_timestamp": [datetime(2025, 6, 10, 12, tzinfo=UTC)]})
    hist = fstore.historical_features(store, "churn", between)
    first = pd.read_parquet(results[0].path).set_index("customer_id")
    assert hist.loc[0, "orders_lifetime"] == first.loc["C1", "orders_lifetime"]  # not the Jun 10 purchase


def test_online_features_after_materialize_equal_latest_snapshot(applied):
    home, store, results = applied
    fstore.materialize(store, home)
    latest = expand_frame(pd.read_parquet(results[-1].path).sort_values("customer_id").reset_index(drop=True))

    for service in FEATURE_SERVICES:
        online = fstore.online_features(store, service, latest["customer_id"].tolist())
        _assert_same(online, latest, _service_features(service))


def test_materialize_in_small_batches_writes_every_customer_and_records_the_interval(applied):
    home, store, results = applied
    seen = []
    start, end = fstore.materialize(store, home, on_progress=lambda done, total: seen.append((done, total)),
                                    batch_rows=1)
    latest = expand_frame(pd.read_parquet(results[-1].path).sort_values("customer_id").reset_index(drop=True))
    assert seen == [(1, 2), (2, 2)]  # one batch per customer, progress up to every row of the latest snapshot
    online = fstore.online_features(store, "send_time", latest["customer_id"].tolist())
    _assert_same(online, latest, _service_features("send_time"))
    view = store.get_feature_view("customer_hour_profile_fv")
    assert view.materialization_intervals[-1] == (start, end)


def test_online_read_of_unknown_customer_returns_nulls(applied):
    home, store, _ = applied
    fstore.materialize(store, home)
    online = fstore.online_features(store, "churn", ["C1", "NOT-A-CUSTOMER"])
    assert online.loc[0, "orders_lifetime"] >= 1
    assert pd.isna(online.loc[1, "orders_lifetime"]) and online.loc[1, "segment"] is None


def test_feature_services_registered_per_model(applied):
    _, store, _ = applied
    for service, views in FEATURE_SERVICES.items():
        fs = store.get_feature_service(service)
        assert sorted(p.name for p in fs.feature_view_projections) == sorted(f"{v}_fv" for v in views)
    profile = store.get_feature_view("customer_profile_fv")
    assert {"attr_age_band", "attr_household_size"} <= {f.name for f in profile.features}


def test_materialize_before_apply_says_what_to_run(tmp_path):
    home = tmp_path / "home"
    load(write_contract(tmp_path / "src"), home)
    build(home, [T1])
    with pytest.raises(fstore.FeatureStoreError, match="engage features apply"):
        fstore.materialize(fstore.open_store(home), home)


def test_materialize_without_snapshots_says_what_to_run(tmp_path):
    home = tmp_path / "home"
    store = fstore.open_store(home)
    fstore.apply(store, home, {}, ttl_days=35)
    with pytest.raises(fstore.FeatureStoreError, match="engage features build"):
        fstore.materialize(store, home)
