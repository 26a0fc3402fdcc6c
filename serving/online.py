"""Online features for scoring: one read of every feature the loaded models need, straight from Feast.

``FeatureStore.get_online_features`` builds a response object, validates and converts every value
through several layers, which costs more than the models themselves on a one-customer request. This
reads the same rows through the online store's own ``online_read`` (the interface every Feast online
store implements: SQLite, Redis, PostgreSQL), once per feature view, and converts values with no
intermediate frames. On the two stores Engage ships it goes one step further, reading the installed Feast's
storage layout with Feast's own key functions: every view's features of the request's customers in one SQLite
query (:class:`_SqliteTablesReader`, the embedded profile), or in one HMGET per customer on a single Redis
server (:class:`_RedisHashReader`, the production profile). ``tests/test_online.py`` (SQLite, both paths) and
``tests/test_production.py`` (Redis) check they return exactly what ``get_online_features`` returns.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from feast import FeatureStore
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.type_map import feast_value_type_to_python_type

from features.snapshots import ENTITY
from features.store import fast_failing_online_store

log = logging.getLogger(__name__)
_SCALARS = frozenset({"int32_val", "int64_val", "double_val", "float_val", "bool_val", "string_val"})
# Lists of numbers (the hour vectors): Feast's conversion of these is list(value.<kind>.val), after a dozen checks
_NUMBER_LISTS = frozenset({"int32_list_val", "int64_list_val", "double_list_val", "float_list_val", "bool_list_val"})


class OnlineStoreUnavailable(RuntimeError):
    """The online store could not be read (the answer is built from defaults, flagged degraded)."""


@dataclass
class OnlineRows:
    """Feature values of some customers, column-wise: ``values[name][i]`` is customer ``i``'s value."""

    customer_ids: list[str]
    values: dict[str, list]
    timestamps: list[datetime | None]  # the newest feature row read per customer; None = not in the store
    # per feature view (name without _fv): each customer's row time in that view, None = no row
    view_timestamps: dict[str, list[datetime | None]] = field(default_factory=dict)

    def found(self, i: int) -> bool:
        return self.timestamps[i] is not None


def view_name(feast_name: str) -> str:
    """A feature view's name without Feast's ``_fv`` suffix (as in ``features.catalog.VIEWS`` and the config)."""
    return feast_name[:-3] if feast_name.endswith("_fv") else feast_name


@dataclass
class Freshness:
    """What :func:`drop_stale` found, per customer."""

    ages: list[float | None]  # seconds from the oldest feature row an answer used to its time; None: used none
    stale: list[list[str]]  # the feature views dropped as older than their limit


def drop_stale(rows: OnlineRows, features: Mapping[str, Sequence[str]], max_age_s: Mapping[str, float],
               now: Sequence[datetime]) -> Freshness:
    """Treat every feature view older than its limit at customer ``i``'s ``now[i]`` as missing, in ``rows``.

    Feast does not enforce a view's TTL online: a store whose materialization stopped keeps answering with
    old values. A view whose row is older than ``max_age_s[view]`` gets its ``features`` set to None (the
    models' missing-value path) and is listed in ``stale``. ``rows.timestamps[i]`` becomes the newest row
    time left; a customer whose every view was dropped keeps the newest one (known, not a cold start).
    A row newer than ``now`` (a request dated in the past) counts as age 0.
    """
    n = len(rows.customer_ids)
    stale: list[list[str]] = [[] for _ in range(n)]
    oldest: list[datetime | None] = [None] * n
    newest: list[datetime | None] = [None] * n
    for view, times in rows.view_timestamps.items():
        limit = max_age_s.get(view)
        for i, ts in enumerate(times):
            if ts is None:
                continue
            if limit is not None and (now[i] - ts).total_seconds() > limit:
                stale[i].append(view)
                for name in features.get(view, ()):
                    rows.values[name][i] = None
                continue
            if oldest[i] is None or ts < oldest[i]:
                oldest[i] = ts
            if newest[i] is None or ts > newest[i]:
                newest[i] = ts
    ages: list[float | None] = [None] * n
    for i in range(n):
        if oldest[i] is not None:
            ages[i] = max((now[i] - oldest[i]).total_seconds(), 0.0)
        if stale[i] and newest[i] is not None:
            rows.timestamps[i] = newest[i]
    return Freshness(ages, stale)


def _python(value: ValueProto):
    kind = value.WhichOneof("val")
    if kind is None:
        return None
    if kind in _SCALARS:
        return getattr(value, kind)
    if kind in _NUMBER_LISTS:
        return list(getattr(value, kind).val)
    return feast_value_type_to_python_type(value)


def _entity_key(customer_id: str) -> EntityKeyProto:
    return EntityKeyProto(join_keys=[ENTITY], entity_values=[ValueProto(string_val=customer_id)])


def _newest(by_view: Mapping[str, list[datetime | None]], n: int) -> list[datetime | None]:
    """Each customer's newest row time over the views (None: no view has a row)."""
    stamps: list[datetime | None] = [None] * n
    for times in by_view.values():
        for i, when in enumerate(times):
            if when is not None and (stamps[i] is None or when > stamps[i]):
                stamps[i] = when
    return stamps


class OnlineReader:
    """Reads the union of some feature services' features for a list of customers.

    Args:
        store: an applied Feast store.
        services: feature service names (one per loaded model).
        extra: more features to read, ``{view name without the _fv suffix: feature names}`` (the
            facts the decision policy needs whichever models are loaded).
    """

    def __init__(self, store: FeatureStore, services: Iterable[str], extra: Mapping[str, Iterable[str]] | None = None):
        self.config = store.config
        self.online_store = fast_failing_online_store(store.config)
        wanted: dict[str, set[str]] = {}
        for service in services:
            for projection in store.get_feature_service(service).feature_view_projections:
                wanted.setdefault(projection.name, set()).update(f.name for f in projection.features)
        for view, names in (extra or {}).items():
            known = {f.name for f in store.get_feature_view(f"{view}_fv").features}
            wanted.setdefault(f"{view}_fv", set()).update(n for n in names if n in known)
        self.views = [(store.get_feature_view(name), sorted(names)) for name, names in sorted(wanted.items())]
        self.feature_names = [n for _, names in self.views for n in names]
        # feature view (name without _fv) -> the features read from it
        self.view_features = {view_name(view.name): names for view, names in self.views}
        _warn_about_listpack_hashes(self.online_store, self.config)
        self._fast: _RedisHashReader | _SqliteTablesReader | None = None  # one read for all views, where known
        if _plain_redis(self.config):
            self._fast = _RedisHashReader(self.online_store, self.config, self.views)
        elif type(self.online_store).__name__ == "SqliteOnlineStore" and not self.config.online_store.vector_enabled:
            self._fast = _SqliteTablesReader(self.online_store, self.config, self.views)

    def read(self, customer_ids: Sequence[str]) -> OnlineRows:
        if self._fast is not None:
            try:
                values, by_view = self._fast.read(customer_ids)
            except Exception as exc:  # any backend error: the caller answers from defaults
                raise OnlineStoreUnavailable(f"online store read failed: {type(exc).__name__}") from exc
            return OnlineRows(list(customer_ids), values, _newest(by_view, len(customer_ids)), by_view)
        return self.read_per_view(customer_ids)

    def read_per_view(self, customer_ids: Sequence[str]) -> OnlineRows:
        """The same rows through Feast's ``online_read``, one call per view (any online store)."""
        n = len(customer_ids)
        keys = [_entity_key(c) for c in customer_ids]
        values: dict[str, list] = {name: [None] * n for name in self.feature_names}
        by_view: dict[str, list[datetime | None]] = {}
        for view, names in self.views:
            try:
                rows = self.online_store.online_read(self.config, view, keys, names)
            except Exception as exc:  # any backend error: the caller answers from defaults
                raise OnlineStoreUnavailable(f"online store read of {view.name} failed: {type(exc).__name__}") from exc
            times = by_view[view_name(view.name)] = [None] * n
            for i, (ts, feats) in enumerate(rows):
                if not feats:
                    continue
                times[i] = ts
                for name in names:
                    if name in feats:
                        values[name][i] = _python(feats[name])
        return OnlineRows(list(customer_ids), values, _newest(by_view, n), by_view)


def _plain_redis(config) -> bool:
    """A single Redis server (not a cluster or sentinel), read with redis-py: the hash layout read below."""
    store = config.online_store
    return (getattr(store, "type", "") == "redis" and getattr(store, "redis_type", "redis") == "redis"
            and getattr(store, "client", "redis") == "redis")


class _RedisHashReader:
    """Every view's features of a customer in one HMGET, and one round trip per request.

    Feast's Redis store keeps one hash per customer (key: the serialized entity key + project) whose fields
    are ``mmh3("<view>:<feature>")`` with a ``ValueProto`` each, plus ``_ts:<view>`` holding the view's event
    time as a ``Timestamp``. Its ``online_read`` reads one view per call (a pipeline round trip each, six here)
    and hashes every field name on every call; this hashes them once, asks for all views' fields in a single
    HMGET per customer (one pipeline for a batch), and uses Feast's own key and hash functions, so the layout
    is the installed Feast's. A view whose ``_ts`` field is absent has no row for the customer; Feast's
    ``online_read`` reports such a view with an epoch timestamp and empty values, which would make an
    unknown customer look known.
    """

    def __init__(self, online_store, config, views) -> None:
        from feast.infra.online_stores.helpers import _mmh3, compute_versioned_name

        self.client = online_store._get_client(config.online_store)
        self.project = config.project.encode("utf-8")
        self.version = config.entity_key_serialization_version
        versioning = config.registry.enable_online_feature_view_versioning
        self.fields: list[bytes] = []
        self.layout: list[tuple[int, list[tuple[int, str]]]] = []  # per view: (its _ts field, [(field, name)])
        self.view_names = [view_name(view.name) for view, _ in views]
        for view, names in views:
            fv = compute_versioned_name(view, versioning)
            start = len(self.fields)
            self.fields += [_mmh3(f"{fv}:{name}") for name in names]
            self.fields.append(f"_ts:{fv}".encode())
            self.layout.append((len(self.fields) - 1, [(start + j, name) for j, name in enumerate(names)]))

    def key(self, customer_id: str) -> bytes:
        return serialize_entity_key(_entity_key(customer_id), entity_key_serialization_version=self.version) \
            + self.project

    def read(self, customer_ids: Sequence[str]) -> tuple[dict[str, list], dict[str, list[datetime | None]]]:
        """(values by feature, row time per view and customer)."""
        from google.protobuf.timestamp_pb2 import Timestamp

        n = len(customer_ids)
        keys = [self.key(c) for c in customer_ids]
        if n == 1:
            replies = [self.client.hmget(keys[0], self.fields)]
        else:
            with self.client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hmget(key, self.fields)
                replies = pipe.execute()
        values: dict[str, list] = {name: [None] * n for _, names in self.layout for _, name in names}
        by_view: dict[str, list[datetime | None]] = {v: [None] * n for v in self.view_names}
        times = [by_view[v] for v in self.view_names]
        value, ts = ValueProto(), Timestamp()
        for i, reply in enumerate(replies):
            for (ts_field, names), view_times in zip(self.layout, times, strict=True):
                raw_ts = reply[ts_field]
                if raw_ts is None:  # the view has no row for this customer
                    continue
                ts.ParseFromString(raw_ts)
                view_times[i] = datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, tz=UTC)
                for slot, name in names:
                    raw = reply[slot]
                    if raw:
                        value.ParseFromString(raw)
                        values[name][i] = _python(value)
        return values, by_view


KEYS_PER_QUERY = 500  # customers per SQLite query (well under its limit of bound parameters)


class _SqliteTablesReader:
    """Every view's features of some customers in one query on Feast's SQLite online store.

    Feast keeps one table per view (``<project>_<view>``) with a row per customer and feature: the serialized
    entity key, the feature name, a ``ValueProto`` and the event time (epoch seconds, written from naive UTC).
    Its ``online_read`` runs one query per view and converts every row's event time; this reads all views'
    rows of the customers with one ``UNION ALL`` over the same connection (keys serialized by Feast's own
    function), parses only the features the models read, and converts each view's event time once, as Feast
    does (a local-time datetime labelled UTC).
    """

    def __init__(self, online_store, config, views) -> None:
        from feast.infra.online_stores.helpers import compute_table_id

        self.online_store, self.config = online_store, config
        self.version = config.entity_key_serialization_version
        versioning = config.registry.enable_online_feature_view_versioning
        self.view_names = [view_name(view.name) for view, _ in views]
        self.names: list[list[str]] = [list(names) for _, names in views]
        parts = []
        for k, (view, _) in enumerate(views):
            table = compute_table_id(config.project, view, versioning).replace('"', '""')
            # event_ts through an expression: no declared type, so sqlite3 hands back the stored integer. Every
            # feature of a view is read (the models want nearly all; a name filter made the query slower). The
            # keys are numbered parameters, bound once for every view.
            parts.append(f'SELECT {k}, entity_key, feature_name, value, event_ts + 0 FROM "{table}" '
                         f"WHERE entity_key IN ({{keys}})")
        self.sql = " UNION ALL ".join(parts)

    def read(self, customer_ids: Sequence[str]) -> tuple[dict[str, list], dict[str, list[datetime | None]]]:
        """(values by feature, row time per view and customer)."""
        n = len(customer_ids)
        positions: dict[bytes, list[int]] = {}  # a customer asked for twice gets its values at both places
        for i, c in enumerate(customer_ids):
            key = serialize_entity_key(_entity_key(c), entity_key_serialization_version=self.version)
            positions.setdefault(key, []).append(i)
        unique = list(positions)
        conn = self.online_store._get_conn(self.config)
        rows = []
        for start in range(0, len(unique), KEYS_PER_QUERY):
            chunk = unique[start:start + KEYS_PER_QUERY]
            sql = self.sql.replace("{keys}", ",".join(f"?{j}" for j in range(1, len(chunk) + 1)))
            rows += conn.execute(sql, chunk).fetchall()
        values: dict[str, list] = {name: [None] * n for names in self.names for name in names}
        by_view: dict[str, list[datetime | None]] = {v: [None] * n for v in self.view_names}
        times = [by_view[v] for v in self.view_names]
        columns = [{name: values[name] for name in names} for names in self.names]  # per view
        epochs: dict[int, datetime] = {}
        value = ValueProto()
        for k, key, name, raw, epoch in rows:
            at = positions[key]
            if times[k][at[0]] is None:
                when = epochs.get(epoch)
                if when is None:
                    when = epochs[epoch] = datetime.fromtimestamp(int(epoch)).replace(tzinfo=UTC)
                for i in at:
                    times[k][i] = when
            column = columns[k].get(name)
            if column is not None:  # a feature no loaded model reads: not parsed
                value.ParseFromString(raw)
                parsed = _python(value)
                for i in at:
                    column[i] = parsed
        return values, by_view


def _warn_about_listpack_hashes(online_store, config) -> None:
    """Warn when Redis keeps the customers' hashes as listpacks, where a field lookup is a linear scan.

    Feast keeps one Redis hash per customer holding every feature view's fields (about 110). Redis stores a
    hash as a listpack while it has at most ``hash-max-listpack-entries`` fields and no value longer than
    ``hash-max-listpack-value`` bytes; an HMGET of every field then costs fields x fields comparisons. The
    hour vectors (24 doubles, about 200 bytes) exceed Redis's default value limit (64), so with default
    settings every customer's hash is a hash table. This looks at one stored hash (a random key of the
    store's database; nothing is said before the first materialization). Managed Redis may refuse
    OBJECT; then nothing is said either.
    """
    if type(online_store).__name__ != "RedisOnlineStore":
        return
    try:
        client = online_store._get_client(config.online_store)
        key = client.randomkey()
        encoding = client.object("encoding", key) if key is not None else None
        limits = client.config_get("hash-max-listpack-*")
    except Exception:  # noqa: BLE001 - an advisory check must never stop the service
        return
    if isinstance(encoding, bytes):
        encoding = encoding.decode()
    if encoding in ("listpack", "ziplist"):
        log.warning("Redis keeps the feature hashes as %ss (%s): every read scans them linearly (about 10x "
                    "slower). Lower hash-max-listpack-entries or hash-max-listpack-value (Redis's defaults: 128 "
                    "and 64), FLUSHDB the store's database and re-run `engage features materialize`.",
                    encoding, ", ".join(f"{k} {v}" for k, v in sorted(limits.items())))
