"""serving/online.py: the service's online read returns exactly what Feast's SDK returns (embedded store)."""

from __future__ import annotations

import math

from features.store import open_store, sample_customers
from serving.online import OnlineReader
from serving.scoring import POLICY_FEATURES

SERVICES = ("churn", "next_best_offer", "send_time")


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def test_online_read_equals_get_online_features(served):
    store = open_store(served.home)
    reader = OnlineReader(store, SERVICES, POLICY_FEATURES)
    assert reader._redis is None  # SQLite: Feast's online_read, one call per view
    ids = [*sample_customers(served.home, 20), "C-never-seen"]
    rows = reader.read(ids)
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
