"""Online features for scoring: one read of every feature the loaded models need, straight from Feast.

``FeatureStore.get_online_features`` builds a response object, validates and converts every value
through several layers, which costs more than the models themselves on a one-customer request. This
reads the same rows through the online store's own ``online_read`` (the interface every Feast online
store implements: SQLite, Redis, PostgreSQL), once per feature view, and converts values with no
intermediate frames. On a single Redis server it goes one step further: every view's fields of a customer
in one HMGET (:class:`_RedisHashReader`). ``tests/test_online.py`` (SQLite) and
``tests/test_production.py`` (Redis) check both return exactly what ``get_online_features`` returns.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from feast import FeatureStore
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.type_map import feast_value_type_to_python_type

from features.snapshots import ENTITY
from features.store import fast_failing_online_store

log = logging.getLogger(__name__)
_SCALARS = frozenset({"int32_val", "int64_val", "double_val", "float_val", "bool_val", "string_val"})


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
    return feast_value_type_to_python_type(value)


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
        self._redis = _RedisHashReader(self.online_store, self.config, self.views) if _plain_redis(self.config) \
            else None

    def read(self, customer_ids: Sequence[str]) -> OnlineRows:
        if self._redis is not None:
            try:
                values, stamps, by_view = self._redis.read(customer_ids)
            except Exception as exc:  # any backend error: the caller answers from defaults
                raise OnlineStoreUnavailable(f"online store read failed: {type(exc).__name__}") from exc
            return OnlineRows(list(customer_ids), values, stamps, by_view)
        n = len(customer_ids)
        keys = [EntityKeyProto(join_keys=[ENTITY], entity_values=[ValueProto(string_val=c)]) for c in customer_ids]
        values: dict[str, list] = {name: [None] * n for name in self.feature_names}
        stamps: list[datetime | None] = [None] * n
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
                if ts is not None and (stamps[i] is None or ts > stamps[i]):
                    stamps[i] = ts
                for name in names:
                    if name in feats:
                        values[name][i] = _python(feats[name])
        return OnlineRows(list(customer_ids), values, stamps, by_view)


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
        from feast.infra.key_encoding_utils import serialize_entity_key

        entity = EntityKeyProto(join_keys=[ENTITY], entity_values=[ValueProto(string_val=customer_id)])
        return serialize_entity_key(entity, entity_key_serialization_version=self.version) + self.project

    def read(self, customer_ids: Sequence[str]
             ) -> tuple[dict[str, list], list[datetime | None], dict[str, list[datetime | None]]]:
        """(values by feature, newest row time per customer, row time per view and customer)."""
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
        stamps: list[datetime | None] = [None] * n
        by_view: dict[str, list[datetime | None]] = {v: [None] * n for v in self.view_names}
        times = [by_view[v] for v in self.view_names]
        value, ts = ValueProto(), Timestamp()
        for i, reply in enumerate(replies):
            for (ts_field, names), view_times in zip(self.layout, times, strict=True):
                raw_ts = reply[ts_field]
                if raw_ts is None:  # the view has no row for this customer
                    continue
                ts.ParseFromString(raw_ts)
                when = view_times[i] = datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, tz=UTC)
                if stamps[i] is None or when > stamps[i]:
                    stamps[i] = when
                for slot, name in names:
                    raw = reply[slot]
                    if raw:
                        value.ParseFromString(raw)
                        values[name][i] = _python(value)
        return values, stamps, by_view


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
