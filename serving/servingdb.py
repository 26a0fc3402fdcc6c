"""The serving database: the decision log and the feedback store (SQLAlchemy Core, any dialect).

The default is one SQLite file, ``$ENGAGE_HOME/serving/serving.db``, in WAL mode with
``synchronous=FULL`` (an acknowledged write survives a power cut) and a busy timeout, so
threads and processes can write to it at once. Set ``ENGAGE_SERVING_DB_URL`` to any
SQLAlchemy URL (``postgresql+psycopg://user@host/db`` in production) to use another database.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import StaticPool

from engage import profile
from engage.settings import resolve_home

SERVING_DB_FILE = Path("serving") / "serving.db"
Chunk = dict[str, list] | pa.Table  # rows given to bulk_insert: column lists, or an Arrow table
BUSY_TIMEOUT_MS = 10_000  # how long a SQLite writer waits for another writer's lock


class UTCDateTime(sa.TypeDecorator):
    """A timezone-aware UTC timestamp on every dialect (SQLite keeps naive UTC text).

    Binds aware datetimes (converted to UTC), naive ones (taken as UTC) and ISO 8601 strings;
    reads back aware UTC datetimes.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> datetime | None:
        value = as_utc(value)
        return value.replace(tzinfo=None) if value is not None and dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> datetime | None:
        return as_utc(value)


def as_utc(value: datetime | str | None) -> datetime | None:
    """An aware UTC datetime from a datetime (naive = UTC) or an ISO 8601 string."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = sa.MetaData()

decisions = sa.Table(
    "decisions",
    metadata,
    sa.Column("decision_id", sa.String(64), primary_key=True),  # makes a retried flush a no-op
    sa.Column("request_id", sa.String(128), nullable=False, index=True),
    sa.Column("exposure_id", sa.String(128), nullable=True, unique=True),  # NULL when action is none
    sa.Column("customer_id", sa.String(128), nullable=False, index=True),
    sa.Column("decided_at", UTCDateTime(), nullable=False, index=True),
    sa.Column("source", sa.String(16), nullable=False),  # api | batch
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("reason", sa.String(128)),
    sa.Column("chosen_offer", sa.String(128)),
    sa.Column("channel", sa.String(32)),
    sa.Column("send_at", UTCDateTime()),
    sa.Column("propensity", sa.Float),
    sa.Column("cold_start", sa.Boolean, nullable=False, default=False),
    sa.Column("degraded", sa.Boolean, nullable=False, default=False),
    sa.Column("holdout", sa.Boolean, nullable=True, default=False),  # in the control group (added in v0.2)
    sa.Column("feature_timestamp", UTCDateTime()),
    sa.Column("model_versions", sa.JSON),
    sa.Column("payload", sa.JSON),  # candidate offers and channels with scores, suppressions, churn facts
)

feedback = sa.Table(
    "feedback",
    metadata,
    sa.Column("exposure_id", sa.String(128), primary_key=True),
    sa.Column("request_id", sa.String(128)),
    sa.Column("customer_id", sa.String(128), nullable=False),
    sa.Column("channel", sa.String(32)),
    sa.Column("offer_id", sa.String(128)),  # NULL = a message without an offer
    sa.Column("propensity", sa.Float),  # copied from the decision
    sa.Column("sent", sa.Boolean, nullable=False, default=False),
    sa.Column("sent_at", UTCDateTime()),
    sa.Column("opened", sa.Boolean, nullable=False, default=False),
    sa.Column("opened_at", UTCDateTime()),
    sa.Column("clicked", sa.Boolean, nullable=False, default=False),
    sa.Column("converted", sa.Boolean, nullable=False, default=False),
    sa.Column("revenue", sa.Float, nullable=False, default=0.0),
    sa.Column("received_at", UTCDateTime(), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.Index("ix_feedback_customer_sent", "customer_id", "sent_at"),
)


def serving_db_url(home: Path) -> str:
    """``ENGAGE_SERVING_DB_URL`` if set, else ``ENGAGE_POSTGRES_URL`` under the production profile, else the
    SQLite file under ``home``."""
    url = os.environ.get("ENGAGE_SERVING_DB_URL", "").strip() or profile.default_serving_db_url()
    return url or f"sqlite:///{(Path(home) / SERVING_DB_FILE).resolve()}"


def create_serving_engine(url: str | None = None, *, home: Path | None = None, create: bool = True) -> Engine:
    """An engine for ``url`` (default: :func:`serving_db_url` of ``resolve_home(home)``), tables created
    unless ``create`` is false (the service creates them once the database answers: :func:`create_tables`)."""
    if url is None:
        url = serving_db_url(resolve_home(home))
    parsed = make_url(url)
    if parsed.drivername == "postgresql":  # SQLAlchemy 2.0 would pick psycopg2, which we do not ship
        parsed = parsed.set(drivername="postgresql+psycopg")
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:"):  # one shared in-memory database for every thread
            kwargs.update(poolclass=StaticPool, connect_args={"check_same_thread": False})
        else:
            Path(database).parent.mkdir(parents=True, exist_ok=True)
            kwargs.update(connect_args={"timeout": BUSY_TIMEOUT_MS / 1000, "check_same_thread": False})
    if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
        kwargs["connect_args"] = {"connect_timeout": 5}  # an unreachable server fails a write, not hangs it
    engine = sa.create_engine(parsed, pool_pre_ping=parsed.get_backend_name() != "sqlite", **kwargs)
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    if create:
        create_tables(engine)
    return engine


def create_tables(engine: Engine) -> None:
    """Create the serving tables if missing (several processes may race: a lost race is not an error), and
    add the nullable columns a table made by an earlier version lacks."""
    try:
        metadata.create_all(engine)
    except (sa.exc.IntegrityError, sa.exc.ProgrammingError):  # PostgreSQL: another process created it first
        metadata.create_all(engine)
    _add_missing_columns(engine)


def _add_missing_columns(engine: Engine) -> None:
    inspector = sa.inspect(engine)
    for table in metadata.sorted_tables:
        have = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in have or not column.nullable:
                continue
            kind = column.type.compile(dialect=engine.dialect)
            try:
                with engine.begin() as con:
                    con.exec_driver_sql(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}')
            except (sa.exc.OperationalError, sa.exc.ProgrammingError):  # another process added it first
                if column.name not in {c["name"] for c in sa.inspect(engine).get_columns(table.name)}:
                    raise


SQLITE_MMAP_BYTES = 1 << 30  # address space, not memory: pages are the OS cache's
SQLITE_CACHE_KIB = 64 * 1024  # per connection, allocated as used
SQLITE_BULK_CACHE_KIB = 1024 * 1024  # during a bulk insert (bulk_insert): the indexes of a million decisions


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cur = dbapi_connection.cursor()
    try:
        cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = FULL")
        cur.execute("PRAGMA foreign_keys = ON")
        # Reads through a memory map and a larger page cache: a nightly list appends a million decisions to
        # five indexes with random keys, which with the default 2 MB cache is one read() call per page.
        cur.execute(f"PRAGMA mmap_size = {SQLITE_MMAP_BYTES}")
        cur.execute(f"PRAGMA cache_size = -{SQLITE_CACHE_KIB}")
    finally:
        cur.close()


class RowInserter:
    """``INSERT ... ON CONFLICT DO NOTHING`` of rows given as column lists (every column of ``table``), prepared
    once for an engine: SQLAlchemy's own statement and each column's bind processor for the dialect, so the
    stored values are exactly what ``con.execute(insert, rows)`` stores, without its per-row statement building
    (an executemany of prepared tuples). Values repeated in a column (as-of times, the run id) are processed once.
    Columns in ``encoded`` hold values already in the database's form (JSON columns: JSON text), passed as is.
    """

    def __init__(self, engine: Engine, table: sa.Table, encoded: Collection[str] = ()) -> None:
        dialect = engine.dialect
        self.table, self.dialect = table, dialect
        self.names = [c.name for c in table.columns]
        self.encoded = frozenset(encoded)
        self.compiled = upsert(engine, table).on_conflict_do_nothing().compile(dialect=dialect)
        self.processors = {name: None if name in encoded else
                           table.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in self.names}

    def insert(self, con: sa.Connection, columns: Chunk) -> int:
        """Insert one chunk inside ``con``'s transaction; returns its rows (existing keys are skipped)."""
        names = self.names
        if isinstance(columns, pa.Table):
            _check_json_text(self.table, self.encoded)
            columns = arrow_columns(columns, self.table)
        n = _check_columns(self.table, names, columns)
        if n == 0:
            return 0
        processed = {name: _processed(columns[name], self.processors[name]) for name in names}
        if self.dialect.positional:
            params: list = list(zip(*(processed[k] for k in self.compiled.positiontup), strict=True))
        else:
            params = [dict(zip(names, row, strict=True)) for row in zip(*(processed[k] for k in names), strict=True)]
        con.exec_driver_sql(self.compiled.string, params)
        return n


class CopyInserter:
    """The same insert as :class:`RowInserter` on PostgreSQL, through ``COPY``: each chunk's column lists become
    CSV in Arrow (no Python per row), are copied into a temporary table shaped like ``table`` (its NOT NULL
    constraints, none of its indexes), and move over with one ``INSERT ... SELECT ... ON CONFLICT DO NOTHING``.

    A prepared executemany costs the client about 30 us of Python per 18-column row and the server a statement
    per row; a million decisions took 50 s that way. Values are converted as the columns' types bind them:
    timestamps as UTC (naive = UTC, ISO strings parsed), JSON with the dialect's serializer, ``encoded`` columns
    (JSON text) as given. In a transaction: :meth:`begin` once, then :meth:`encode` and :meth:`send` per chunk.
    """

    def __init__(self, engine: Engine, table: sa.Table, encoded: Collection[str] = ()) -> None:
        if engine.dialect.name != "postgresql":
            raise ValueError(f"COPY is PostgreSQL's, not {engine.dialect.name}'s")
        self.table, self.dialect, self.encoded = table, engine.dialect, frozenset(encoded)
        self.names = [c.name for c in table.columns]
        self.converters = {c.name: _copy_converter(c, encoded, engine.dialect) for c in table.columns}
        load = f"engage_load_{table.name}"
        columns = ", ".join(f'"{n}"' for n in self.names)
        self.create_sql = f'CREATE TEMPORARY TABLE IF NOT EXISTS "{load}" (LIKE "{table.name}") ON COMMIT DROP'
        self.copy_sql = f'COPY "{load}" ({columns}) FROM STDIN (FORMAT csv)'
        self.move_sql = (f'INSERT INTO "{table.name}" ({columns}) SELECT {columns} FROM "{load}" '
                         "ON CONFLICT DO NOTHING")
        self.clear_sql = f'TRUNCATE "{load}"'

    @staticmethod
    def supports(table: sa.Table) -> bool:
        """Whether every column of ``table`` has a type :class:`CopyInserter` converts."""
        return all(_arrow_type(c) is not None for c in table.columns)

    def begin(self, con: sa.Connection) -> None:
        con.exec_driver_sql(self.create_sql)

    def encode(self, columns: Chunk) -> tuple[bytes, int]:
        """One chunk as the CSV that :meth:`send` copies, and its number of rows."""
        if isinstance(columns, pa.Table):
            _check_json_text(self.table, self.encoded)
            n = _check_columns(self.table, self.names, {c: columns.column(c) for c in columns.column_names})
            arrays = [_cast_arrow(self.table.c[name], columns.column(name)) for name in self.names]
        else:
            n = _check_columns(self.table, self.names, columns)
            arrays = [self._array(name, columns[name]) for name in self.names]
        if n == 0:
            return b"", 0
        data = io.BytesIO()
        pa_csv.write_csv(pa.Table.from_arrays(arrays, names=self.names), data,
                         pa_csv.WriteOptions(include_header=False))
        return data.getvalue(), n

    def _array(self, name: str, values: list) -> pa.Array:
        arrow_type, convert = self.converters[name]
        try:
            return pa.array(values if convert is None else _processed(values, convert), type=arrow_type)
        except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"column {name} of {self.table.name}: {exc}") from exc

    def send(self, con: sa.Connection, data: bytes) -> None:
        """Copy one encoded chunk and move it into the table, inside ``con``'s transaction."""
        raw = con.connection.dbapi_connection
        try:
            with raw.cursor() as cur:
                with cur.copy(self.copy_sql) as copy:
                    copy.write(data)
                cur.execute(self.move_sql)
                cur.execute(self.clear_sql)
        except self.dialect.loaded_dbapi.Error as exc:  # as SQLAlchemy would raise it (IntegrityError, ...)
            raise sa.exc.DBAPIError.instance(self.copy_sql, None, exc, self.dialect.loaded_dbapi.Error) from exc


def _arrow_type(column: sa.Column) -> pa.DataType | None:
    kind = column.type
    if isinstance(kind, UTCDateTime):
        return pa.timestamp("us", tz="UTC")  # written as ...Z: PostgreSQL reads the instant
    if isinstance(kind, (sa.JSON, sa.String)):
        return pa.string()
    if isinstance(kind, sa.Boolean):
        return pa.bool_()
    if isinstance(kind, sa.Float):
        return pa.float64()
    if isinstance(kind, sa.Integer):
        return pa.int64()
    return None


def _copy_converter(column: sa.Column, encoded: Collection[str],
                    dialect: sa.Dialect) -> tuple[pa.DataType, Callable[[Any], Any] | None]:
    """A column's Arrow type and what makes its bound values into that type (None: nothing)."""
    arrow_type = _arrow_type(column)
    if arrow_type is None:
        raise ValueError(f"COPY does not convert column {column.name} ({column.type})")
    if isinstance(column.type, UTCDateTime):
        return arrow_type, as_utc
    if isinstance(column.type, sa.JSON) and column.name not in encoded:
        return arrow_type, getattr(dialect, "_json_serializer", None) or json.dumps  # None -> JSON null, as bound
    return arrow_type, None


def bulk_insert(engine: Engine, table: sa.Table, chunks: Iterable[Chunk], *, encoded: Collection[str] = (),
                on_chunk: Callable[[int], None] | None = None) -> int:
    """Insert chunks of rows (column lists or Arrow tables), skipping rows whose keys exist, all in ONE transaction
    (nothing is stored unless everything is); returns the rows offered. PostgreSQL copies them
    (:class:`CopyInserter`: the next chunk is encoded while the server takes the last one), SQLite inserts them
    prepared (:class:`RowInserter`).

    One transaction rather than one per chunk: the keys of a decision log are random, so each commit of a few
    thousand rows rewrote most pages of every index (a million rows wrote the indexes hundreds of times over).
    On SQLite the transaction gets a page cache of :data:`SQLITE_BULK_CACHE_KIB` for the same reason.
    """
    if engine.dialect.name == "postgresql" and CopyInserter.supports(table):
        return _copy_chunks(engine, CopyInserter(engine, table, encoded), chunks, on_chunk)
    inserter = RowInserter(engine, table, encoded)
    sqlite_db = engine.dialect.name == "sqlite"
    offered = 0
    with engine.begin() as con:
        if sqlite_db:
            con.exec_driver_sql(f"PRAGMA cache_size = -{SQLITE_BULK_CACHE_KIB}")
        try:
            for columns in chunks:
                n = inserter.insert(con, columns)
                if n == 0:
                    continue
                offered += n
                if on_chunk:
                    on_chunk(n)
        finally:
            if sqlite_db:
                with contextlib.suppress(sa.exc.DBAPIError):
                    con.exec_driver_sql(f"PRAGMA cache_size = -{SQLITE_CACHE_KIB}")
    return offered


def _copy_chunks(engine: Engine, inserter: CopyInserter, chunks: Iterable[Chunk],
                 on_chunk: Callable[[int], None] | None) -> int:
    """:func:`bulk_insert` through COPY, one chunk in flight: a thread sends it (waiting on the server without
    the GIL) while this one makes and encodes the next."""
    offered = 0
    pending: tuple[Future, int] | None = None

    def settle() -> None:  # wait for the chunk in flight and count it
        nonlocal offered, pending
        (future, n), pending = pending, None
        future.result()
        offered += n
        if on_chunk:
            on_chunk(n)

    with engine.begin() as con, ThreadPoolExecutor(1, thread_name_prefix="engage-copy") as sender:
        inserter.begin(con)
        try:
            for columns in chunks:
                data, n = inserter.encode(columns)
                if n == 0:
                    continue
                if pending is not None:
                    settle()
                pending = (sender.submit(inserter.send, con, data), n)
            if pending is not None:
                settle()
        finally:
            if pending is not None:  # failed meanwhile: the send ends before the transaction rolls back
                with contextlib.suppress(Exception):
                    pending[0].result()
    return offered


def arrow_columns(chunk: pa.Table, table: sa.Table) -> dict[str, list]:
    """An Arrow chunk as :class:`RowInserter`'s column lists (the columns of ``table`` it has). Timestamps become
    datetimes once per distinct value: one per row cost about 4 s a million, and a log's times repeat."""
    out = {}
    for name in (c.name for c in table.columns):
        if name not in chunk.column_names:
            continue
        column = _cast_arrow(table.c[name], chunk.column(name))
        out[name] = _repeated_values(column) if pa.types.is_timestamp(column.type) else column.to_pylist()
    return out


def _cast_arrow(column: sa.Column, values: pa.ChunkedArray) -> pa.ChunkedArray:
    """An Arrow column as the Arrow type of ``column`` (as is when it has none); ValueError naming the column."""
    kind = _arrow_type(column)
    if kind is None:
        return values
    try:
        return values.cast(kind)
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise ValueError(f"column {column.name} of {column.table.name}: {exc}") from exc


def _check_json_text(table: sa.Table, encoded: Collection[str]) -> None:
    """An Arrow chunk holds JSON columns as JSON text, named in ``encoded``: raises ValueError otherwise."""
    raw = [c.name for c in table.columns if isinstance(c.type, sa.JSON) and c.name not in encoded]
    if raw:
        raise ValueError(f"an Arrow chunk of {table.name} gives its JSON columns as JSON text: name "
                         f"{', '.join(raw)} in encoded")


def _repeated_values(column: pa.ChunkedArray) -> list:
    """``column.to_pylist()``, each distinct value made into a Python object once."""
    encoded = column.combine_chunks().dictionary_encode()
    values = encoded.dictionary.to_pylist()
    return [None if i is None else values[i] for i in encoded.indices.to_pylist()]


def _check_columns(table: sa.Table, names: list[str], columns: dict[str, list]) -> int:
    """The number of rows of a chunk; raises ValueError for a missing column or one of another length."""
    missing = [n for n in names if n not in columns]
    if missing:
        raise ValueError(f"no values for column(s) {', '.join(missing)} of {table.name}")
    n = len(columns[names[0]])
    for name in names:
        if len(columns[name]) != n:
            raise ValueError(f"column {name} has {len(columns[name])} values, expected {n}")
    return n


def _processed(values: list, proc: Callable[[Any], Any] | None) -> list:
    """``proc`` applied to each value, once per distinct value (unhashable ones: once per object)."""
    if proc is None:
        return values
    memo: dict = {}
    same: dict[int, tuple] = {}  # unhashable values (dicts for JSON) repeated as one object: by identity
    out = []
    last: Any = memo  # the previous value and its result: a column of one repeated object costs a check a row
    last_out: Any = None
    for v in values:
        if v is last:
            out.append(last_out)
            continue
        last = v
        try:
            hit = memo.get(v, memo)
        except TypeError:
            seen = same.get(id(v))
            if seen is None:
                seen = same[id(v)] = (v, proc(v))  # keeps v alive, so its id is not reused meanwhile
            last_out = seen[1]
            out.append(last_out)
            continue
        if hit is memo:
            hit = memo[v] = proc(v)
        last_out = hit
        out.append(hit)
    return out


def upsert(engine_or_dialect: Engine | sa.Dialect, table: sa.Table) -> Any:
    """``INSERT`` with ``on_conflict_do_update`` / ``on_conflict_do_nothing`` for the engine's dialect."""
    dialect = getattr(engine_or_dialect, "dialect", engine_or_dialect)
    if dialect.name == "sqlite":
        return sqlite.insert(table)
    if dialect.name == "postgresql":
        return postgresql.insert(table)
    raise NotImplementedError(f"the serving database supports SQLite and PostgreSQL, not {dialect.name}")
