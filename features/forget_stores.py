"""Find and remove customers in each database Engage keeps: the warehouse, the Feast online store, the
serving database. Every ``remove_*`` is idempotent (a second run finds nothing and changes nothing).

Deleted rows leave their bytes in the database files until the space is reused, so a file database that
lost rows is also compacted: the DuckDB warehouse is copied into a new file that replaces it (DuckDB has
no VACUUM that gives space back), SQLite files get ``secure_delete`` and ``VACUUM``. A marker file beside
the database (``.<name>.forget-pending``) is made before the delete commits and removed after the
compaction, so an interrupted run compacts on the next one even though it finds nothing left to delete.
PostgreSQL and Redis manage their own files: see README ("Forgetting a customer").
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from features.load import connect_warehouse, warehouse_path
from features.snapshots import ENTITY

WAREHOUSE_TABLES = ("events", "exposures", "customers")  # rows keyed by customer_id, children first
_CHUNK = 500  # ids per IN (...) list / per rejects scan


@dataclass
class StoreResult:
    """What one store step removed (``removed``: rows, or keys for Redis) and how (``detail``)."""

    store: str
    removed: int
    detail: str = ""


def _chunks(ids: Sequence[str], n: int = _CHUNK) -> Iterator[list[str]]:
    for i in range(0, len(ids), n):
        yield list(ids[i:i + n])


def _pending_marker(db_file: Path) -> Path:
    return db_file.with_name(f".{db_file.name}.forget-pending")


# --- the warehouse (DuckDB) ------------------------------------------------------------------------


def find_in_warehouse(home: Path, ids: Sequence[str]) -> set[str]:
    if not warehouse_path(home).exists():
        return set()
    con = connect_warehouse(home, read_only=True)
    try:
        union = " UNION ".join(f"SELECT customer_id FROM {t}" for t in WAREHOUSE_TABLES)
        found = {r[0] for r in con.execute(
            f"SELECT DISTINCT customer_id FROM ({union}) WHERE customer_id IN (SELECT unnest(?::VARCHAR[]))",
            [list(ids)]).fetchall()}
        return found | {c for _, hit in _rejected_rows(con, ids) for c in hit}
    finally:
        con.close()


def _rejected_rows(con, ids: Sequence[str]) -> list[tuple[int, set[str]]]:
    """Rejected rows holding one of ``ids`` as an original value (rejects keep a row's values as read)."""
    wanted, out = set(ids), []
    for chunk in _chunks(list(ids)):
        where = " OR ".join("contains(CAST(original AS VARCHAR), ?)" for _ in chunk)  # a cheap pre-filter
        for rowid, original in con.execute(f"SELECT rowid, original FROM rejects WHERE {where}", chunk).fetchall():
            values = json.loads(original) if isinstance(original, str) else (original or {})
            hit = {str(v).strip() for v in values.values() if v is not None} & wanted
            if hit:
                out.append((rowid, hit))
    return out


def remove_from_warehouse(home: Path, ids: Sequence[str]) -> StoreResult:
    """Delete the customers' rows (customers, events, exposures, rejects) in one transaction, then compact."""
    path = warehouse_path(home)
    if not path.exists():
        return StoreResult("warehouse", 0, "no warehouse")
    marker = _pending_marker(path)
    con = connect_warehouse(home)
    try:
        counts: dict[str, int] = {}
        con.begin()
        try:
            for table in WAREHOUSE_TABLES:
                (counts[table],) = con.execute(
                    f"DELETE FROM {table} WHERE customer_id IN (SELECT unnest(?::VARCHAR[]))", [list(ids)]
                ).fetchone()
            rejected = sorted({rowid for rowid, _ in _rejected_rows(con, ids)})
            for chunk in _chunks(rejected):
                con.execute("DELETE FROM rejects WHERE rowid IN (SELECT unnest(?::BIGINT[]))", [chunk])
            counts["rejects"] = len(rejected)
            if any(counts.values()):
                marker.touch()
            con.commit()
        except BaseException:
            con.rollback()
            raise
        compacted = marker.exists()
        if compacted:
            _compact_duckdb(con, path)
            marker.unlink()
    finally:
        con.close()
    detail = ", ".join(f"{t} {n:,}" for t, n in counts.items()) + ("; file compacted" if compacted else "")
    return StoreResult("warehouse", sum(counts.values()), detail)


def _compact_duckdb(con, path: Path) -> None:
    """Copy the database into a new file and put it in place of the old one.

    ``con`` keeps the old file open (and DuckDB's lock on it) until the new file is in place, so no other
    process writes to the old file meanwhile; it has nothing uncommitted, so closing it writes nothing.
    """
    tmp = path.with_name(f".{path.name}.forget.tmp")
    for stale in (tmp, tmp.with_name(tmp.name + ".wal")):
        stale.unlink(missing_ok=True)
    (name,) = con.execute("SELECT current_database()").fetchone()
    con.execute("CHECKPOINT")
    try:
        con.execute(f"ATTACH '{str(tmp).replace(chr(39), chr(39) * 2)}' AS engage_forget_copy")
        con.execute(f'COPY FROM DATABASE "{name}" TO engage_forget_copy')
        con.execute("DETACH engage_forget_copy")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --- the serving database (decision log, feedback) ---------------------------------------------------


def find_in_serving_db(engine: Engine, ids: Sequence[str]) -> set[str]:
    from serving.servingdb import decisions, feedback

    found: set[str] = set()
    inspector = sa.inspect(engine)
    with engine.connect() as con:
        for table in (decisions, feedback):
            if inspector.has_table(table.name):
                for chunk in _chunks(ids):
                    found |= set(con.execute(sa.select(table.c.customer_id).distinct()
                                             .where(table.c.customer_id.in_(chunk))).scalars())
    return found


def remove_from_serving_db(engine: Engine, ids: Sequence[str]) -> StoreResult:
    """Delete the customers' decisions and feedback (one transaction); compact a SQLite file."""
    from serving.servingdb import decisions, feedback

    sqlite_file = _sqlite_file(engine)
    marker = _pending_marker(sqlite_file) if sqlite_file else None
    counts = {}
    inspector = sa.inspect(engine)
    with engine.begin() as con:
        if sqlite_file:
            con.exec_driver_sql("PRAGMA secure_delete = ON")  # deleted cells are overwritten with zeros
        for table in (decisions, feedback):
            counts[table.name] = 0
            if inspector.has_table(table.name):
                for chunk in _chunks(ids):
                    counts[table.name] += con.execute(table.delete().where(table.c.customer_id.in_(chunk))).rowcount
        if marker and any(counts.values()):
            marker.touch()
    detail = ", ".join(f"{t} {n:,}" for t, n in counts.items())
    if marker and marker.exists():
        with engine.connect() as con:
            con = con.execution_options(isolation_level="AUTOCOMMIT")
            con.exec_driver_sql("VACUUM")
            con.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        marker.unlink()
        detail += "; file compacted"
    return StoreResult(f"serving database ({engine.dialect.name})", sum(counts.values()), detail)


def _sqlite_file(engine: Engine) -> Path | None:
    url = make_url(str(engine.url))
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


# --- the Feast online store ----------------------------------------------------------------------------
# Feast (0.67) has no call that deletes one entity's rows: RedisOnlineStore.delete_entity_values removes the
# rows of *every* customer, SqliteOnlineStore only drops whole tables. So the rows and keys are deleted
# directly, with the key built by Feast's own functions (serialize_entity_key, and _redis_key for Redis),
# so they are exactly the keys materialize wrote.


def _entity_key(customer_id: str):
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    return EntityKey(join_keys=[ENTITY], entity_values=[Value(string_val=customer_id)])


def online_store_kind(home: Path) -> tuple[object, str]:
    """The Feast config of the active profile and its online store type (``sqlite`` or ``redis``)."""
    from features.store import repo_config

    config = repo_config(home)
    kind = str(getattr(config.online_store, "type", ""))
    if kind not in ("sqlite", "redis"):
        raise ValueError(f"the Feast online store type {kind!r} is not supported by forget (sqlite, redis)")
    return config, kind


def _sqlite_online(config) -> tuple[Path, list[str]]:
    """The SQLite online store file and its feature tables (those with an ``entity_key`` column)."""
    from feast.infra.online_stores.sqlite import SqliteOnlineStore

    path = Path(SqliteOnlineStore._get_db_path(config))
    if not path.exists():
        return path, []
    with contextlib.closing(sqlite3.connect(path)) as con:
        tables = [name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return path, [t for t in tables if "entity_key" in {r[1] for r in con.execute(f'PRAGMA table_info("{t}")')}]


def _serialized(config, ids: Sequence[str]) -> dict[bytes, str]:
    from feast.infra.key_encoding_utils import serialize_entity_key

    version = config.entity_key_serialization_version
    return {serialize_entity_key(_entity_key(c), entity_key_serialization_version=version): c for c in ids}


def _redis(config):
    from feast.infra.online_stores.redis import RedisOnlineStore

    return RedisOnlineStore()._get_client(config.online_store)


def _redis_keys(config, ids: Sequence[str]) -> dict[bytes, str]:
    from feast.infra.online_stores.helpers import _redis_key

    version = config.entity_key_serialization_version
    return {_redis_key(config.project, _entity_key(c), entity_key_serialization_version=version): c for c in ids}


def find_in_online_store(home: Path, ids: Sequence[str]) -> set[str]:
    config, kind = online_store_kind(home)
    if kind == "redis":
        keys = _redis_keys(config, ids)
        client = _redis(config)
        try:
            with client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.exists(key)
                return {c for c, n in zip(keys.values(), pipe.execute(), strict=True) if n}
        finally:
            client.close()
    path, tables = _sqlite_online(config)
    keys = _serialized(config, ids)
    found: set[str] = set()
    with contextlib.closing(sqlite3.connect(path)) if tables else contextlib.nullcontext() as con:
        for table in tables:
            for chunk in _chunks(list(keys)):
                rows = con.execute(f'SELECT DISTINCT entity_key FROM "{table}" WHERE entity_key IN '
                                   f'({",".join("?" * len(chunk))})', chunk)
                found |= {keys[bytes(k)] for (k,) in rows}
    return found


def remove_from_online_store(home: Path, ids: Sequence[str]) -> StoreResult:
    """Delete the customers' rows (SQLite: every feature table) or keys (Redis: one hash per customer)."""
    config, kind = online_store_kind(home)
    if kind == "redis":
        keys = _redis_keys(config, ids)
        client = _redis(config)
        try:
            with client.pipeline(transaction=False) as pipe:  # one key per command: fine on a cluster too
                for key in keys:
                    pipe.delete(key)
                removed = sum(pipe.execute())
        finally:
            client.close()
        return StoreResult("online store (redis)", removed, "keys (every feature view of a customer)")
    path, tables = _sqlite_online(config)
    if not path.exists():
        return StoreResult("online store (sqlite)", 0, "not materialized")
    keys, marker, removed = list(_serialized(config, ids)), _pending_marker(path), 0
    with contextlib.closing(sqlite3.connect(path)) as con:
        con.execute("PRAGMA secure_delete = ON")
        with con:  # one transaction
            for table in tables:
                for chunk in _chunks(keys):
                    removed += con.execute(f'DELETE FROM "{table}" WHERE entity_key IN '
                                           f'({",".join("?" * len(chunk))})', chunk).rowcount
            if removed:
                marker.touch()
        compacted = marker.exists()
        if compacted:
            con.execute("VACUUM")
            marker.unlink()
    return StoreResult("online store (sqlite)", removed,
                       f"feature rows in {len(tables)} tables" + ("; file compacted" if compacted else ""))
