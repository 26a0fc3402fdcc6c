"""Small helpers shared by tests: load a contract folder, build snapshots, apply and materialize Feast."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pandas as pd

from engage.config import load_config
from features.load import connect_warehouse, ingest
from features.snapshots import SnapshotResult, build_snapshots

# The local PostgreSQL and Redis every machine of this project runs (CI's included).
LOCAL_HOST, PG_PORT, REDIS_PORT = "127.0.0.1", 5432, 6379


def load(src: Path, home: Path):
    return ingest(src, home)


def build(home: Path, times=None) -> list[SnapshotResult]:
    with contextlib.closing(connect_warehouse(home, read_only=True)) as con:
        return build_snapshots(con, home, load_config().features, times)


def apply_and_materialize(home: Path):
    """``engage features apply`` then ``materialize`` for ``home`` (the profile from the environment); the store."""
    from features import store as fstore
    from features.snapshots import profile_columns

    store = fstore.open_store(home)
    with contextlib.closing(connect_warehouse(home, read_only=True)) as con:
        fstore.apply(store, home, profile_columns(con), load_config().features.snapshot_ttl_days)
    fstore.materialize(store, home)
    return store


def frame(result: SnapshotResult) -> pd.DataFrame:
    """A snapshot without its build-time column, indexed by customer."""
    return pd.read_parquet(result.path).drop(columns=["created_at"]).set_index("customer_id").sort_index()
