"""The Feast feature store of one ENGAGE_HOME: open, apply, materialize, read online and historically."""

from __future__ import annotations

import contextlib
import logging
import os
import string
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import yaml
from feast import FeatureStore
from feast.repo_config import RepoConfig

from engage import profile
from engage.settings import FEATURE_REPO_DIR
from feature_repo.definitions import definitions
from features.list_features import expand_frame
from features.snapshots import CREATED_FIELD, ENTITY, TIMESTAMP_FIELD, snapshot_file, snapshot_times_on_disk

log = logging.getLogger(__name__)
FEATURE_STORE_YAML = FEATURE_REPO_DIR / "feature_store.yaml"
PRODUCTION_FEATURE_STORE_YAML = FEATURE_REPO_DIR / "feature_store.production.yaml"


class FeatureStoreError(RuntimeError):
    """The feature store is not in a state to answer (not applied, nothing materialized, ...)."""


def render_feature_store_yaml(home: Path, yaml_file: Path | None = None) -> str:
    """``feature_store.yaml`` of the active profile, with Engage's ``${VARS}`` filled in.

    ``${ENGAGE_HOME}`` is ``home``; under the production profile ``${ENGAGE_FEAST_REGISTRY_URL}`` and
    ``${ENGAGE_FEAST_REDIS}`` come from ``ENGAGE_POSTGRES_URL`` and ``ENGAGE_REDIS_URL``; other ``${VARS}``
    from the environment.
    """
    values = {"ENGAGE_HOME": str(home)}
    if yaml_file is None:
        if profile.is_production():
            prod = profile.production_settings()
            values.update(ENGAGE_FEAST_REGISTRY_URL=prod.postgres_url,
                          ENGAGE_FEAST_REDIS=prod.redis_connection_string)
            yaml_file = PRODUCTION_FEATURE_STORE_YAML
        else:
            yaml_file = FEATURE_STORE_YAML
    text = string.Template(yaml_file.read_text()).safe_substitute(values)
    return os.path.expandvars(text)


def repo_config(home: Path, yaml_file: Path | None = None) -> RepoConfig:
    """The Feast config of the active profile (see :func:`render_feature_store_yaml`)."""
    raw = yaml.safe_load(render_feature_store_yaml(home, yaml_file))
    config = RepoConfig(**raw)
    config.repo_path = FEATURE_REPO_DIR
    return config


def open_store(home: Path) -> FeatureStore:
    (home / "feast").mkdir(parents=True, exist_ok=True)
    _quiet_offline_store()
    return FeatureStore(config=repo_config(home))


def _quiet_offline_store() -> None:
    """Feast's DuckDB offline store runs on ibis's default DuckDB connection, whose own progress bar
    would draw over ours on every query longer than two seconds; commands show their own progress."""
    import ibis

    with contextlib.suppress(Exception):  # a different ibis backend has no such setting: nothing to quiet
        ibis.get_backend().raw_sql("SET enable_progress_bar = false")


def apply(store: FeatureStore, home: Path, profile_columns: dict[str, str], ttl_days: int) -> list[str]:
    """Register the entity, source, views and services; returns the names applied."""
    objects = definitions(home, profile_columns, ttl_days)
    store.apply(objects)
    return [obj.name for obj in objects]


def snapshot_bounds(home: Path) -> tuple[datetime, datetime]:
    """Earliest and latest snapshot time on disk, from the file names."""
    times = snapshot_times_on_disk(home)
    if not times:
        raise FeatureStoreError("no feature snapshots: run `engage features build` first")
    return times[0], times[-1]


def sample_customers(home: Path, n: int) -> list[str]:
    """The first ``n`` customer ids of the latest snapshot (for demos and smoke checks)."""
    _, last = snapshot_bounds(home)
    ids = pd.read_parquet(snapshot_file(home, last), columns=[ENTITY])[ENTITY]
    return ids.head(n).tolist()


MATERIALIZE_BATCH_ROWS = 50_000


def materialize(store: FeatureStore, home: Path, on_progress: Callable[[int, int], None] | None = None,
                batch_rows: int = MATERIALIZE_BATCH_ROWS) -> tuple[datetime, datetime]:
    """Load the latest snapshot of every customer into the online store; returns the window recorded.

    The latest snapshot file holds every customer's newest row: a snapshot at T has everyone who signed up
    before T, and forgetting a customer removes them from every file. That is the row Feast's own
    ``materialize`` over all snapshots would pick. It is written through Feast's ``write_to_online_store``
    (the same conversion and ``online_write_batch`` as ``materialize``), ``batch_rows`` customers at a time
    and view by view, so memory stays flat: Feast's ``materialize`` converts a view's whole window at once
    and was killed at 21 GB on 1,000,000 customers. The registry then records the materialized interval
    per view, as ``feast materialize`` does. ``on_progress(rows done, rows in all)`` after each batch.
    """
    views = store.list_feature_views()
    if not views:
        raise FeatureStoreError("the feature store has no feature views: run `engage features apply` first")
    first, last = snapshot_bounds(home)
    start, end = first - timedelta(seconds=1), last + timedelta(seconds=1)
    source = pq.ParquetFile(snapshot_file(home, last))
    keys = [ENTITY, TIMESTAMP_FIELD, CREATED_FIELD]
    columns = {v.name: [*keys, *(f.name for f in v.features)] for v in views}
    missing = sorted({c for cols in columns.values() for c in cols} - set(source.schema_arrow.names))
    if missing:
        raise FeatureStoreError(f"the latest snapshot lacks features the store serves ({', '.join(missing[:5])}): "
                                "run `engage features build`, then `engage features apply`")
    total, done = source.metadata.num_rows, 0
    for batch in source.iter_batches(batch_size=batch_rows, columns=list(dict.fromkeys(c for cs in columns.values()
                                                                                       for c in cs))):
        frame = batch.to_pandas()
        for view in views:
            store.write_to_online_store(view.name, frame[columns[view.name]])
        done += len(frame)
        if on_progress:
            on_progress(done, total)
    for view in views:
        store.registry.apply_materialization(view, store.project, start, end)
    return start, end


def online_features(store: FeatureStore, service: str, customer_ids: Sequence[str]) -> pd.DataFrame:
    """Online feature values of one feature service for some customers (one store read), list features
    spread into their model columns."""
    fs = store.get_feature_service(service)
    resp = store.get_online_features(features=fs, entity_rows=[{ENTITY: c} for c in customer_ids])
    return expand_frame(resp.to_df())


def historical_features(store: FeatureStore, service: str, entity_df: pd.DataFrame) -> pd.DataFrame:
    """Point-in-time join of a feature service onto ``entity_df`` (``customer_id``, ``event_timestamp``), list
    features spread into their model columns (``features/list_features.py``)."""
    missing = {ENTITY, TIMESTAMP_FIELD} - set(entity_df.columns)
    if missing:
        raise ValueError(f"entity_df needs columns {sorted(missing)}")
    fs = store.get_feature_service(service)
    return expand_frame(store.get_historical_features(entity_df=entity_df, features=fs).to_df())


def fast_failing_online_store(config: RepoConfig):
    """The online store of ``config`` for the scoring path: a Redis store gets a client that gives up at once.

    redis-py retries a failed command with exponential back-off by default, which would hold a request for
    seconds while Redis is down; the service must answer (degraded) instead. No retry, the socket timeouts
    of the connection string (``engage.profile``), and a fresh connection after Redis comes back: the pool
    drops a broken connection and the next read opens a new one, so recovery needs no restart.
    """
    from feast.infra.online_stores.helpers import get_online_store_from_config

    online_store = get_online_store_from_config(config.online_store)
    if getattr(config.online_store, "type", "") == "redis" and config.online_store.redis_type == "redis":
        from redis import Redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        nodes, params = online_store._parse_connection_string(config.online_store.connection_string)
        params.setdefault("socket_timeout", profile.REDIS_SOCKET_TIMEOUT_S)
        params.setdefault("socket_connect_timeout", profile.REDIS_SOCKET_TIMEOUT_S)
        online_store._client = Redis(host=nodes[0]["host"], port=int(nodes[0]["port"]), retry=Retry(NoBackoff(), 0),
                                     **params)
    return online_store
