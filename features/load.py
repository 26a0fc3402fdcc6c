"""Load a folder of contract files (customers, events, offers, exposures) into the warehouse.

Every row is typed and checked in DuckDB SQL; a row that breaks the contract goes
to `rejects` with its original values and a reason, and the good rows load. A file
that cannot be read at all raises ContractError. One `ingest` is one transaction,
so a failed load leaves the warehouse as it was.

The steps, per file:
  stage   a temp view `_raw_<table>` with the 1-based row number `_engage_row` and
          every column under its lower-case name, as read (CSV: all VARCHAR).
  check   a temp table `_chk_<table>`: row number, typed warehouse columns and
          `_reason` ('' for a good row).
  write   good rows into the warehouse table (append with an anti-join on the key,
          or upsert for customers and offers), the others into `rejects`.
"""

from __future__ import annotations

import csv
import gzip
import re
import uuid
import zoneinfo
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from features.contract import BOOL_FALSE, BOOL_TRUE, TABLES, Column, Table

WAREHOUSE_FILE = "warehouse.duckdb"

_SQL_TYPES = {
    "string": "VARCHAR",
    "enum": "VARCHAR",
    "list": "VARCHAR",
    "timezone": "VARCHAR",
    "timestamp": "TIMESTAMP",
    "number": "DOUBLE",
    "bool": "BOOLEAN",
}
_INT_TYPES = {
    "TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT",
    "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT", "UHUGEINT",
}  # fmt: skip
_FLOAT_TYPES = {"FLOAT", "DOUBLE"}
_ROW = "_engage_row"
# Columns of an input file that are bookkeeping, not data: our own column (a
# re-exported warehouse) and the index pandas writes into Parquet.
_IGNORED_EXTRA = re.compile(r"loaded_at|__index_level_\d+__")
_CSV_OPTIONS = "header = true, auto_detect = false, delim = ',', quote = '\"', escape = '\"', comment = ''"
_CSV_SPARE_FIELDS = 8


class ContractError(Exception):
    """A file that cannot be loaded at all; the message names the file and the reason."""


@dataclass
class TableReport:
    """What one ingest did with one file.

    rows == accepted + rejected and accepted == inserted + already_loaded, where
    already_loaded counts keys already in the warehouse (for customers and
    offers: rows that were updated). forgotten counts the rows of customers on the
    suppression list (`engage forget`): dropped, not loaded or rejected, and not in rows.
    """

    table: str
    source: str
    rows: int
    accepted: int
    inserted: int
    already_loaded: int
    rejected: int
    forgotten: int = 0


@dataclass
class IngestReport:
    tables: list[TableReport]

    def get(self, table: str) -> TableReport:
        return next(t for t in self.tables if t.table == table)

    def format_table(self) -> str:
        head = ("table", "file", "rows", "accepted", "inserted", "already loaded", "rejected")
        body = [
            (t.table, Path(t.source).name)
            + tuple(f"{n:,}" for n in (t.rows, t.accepted, t.inserted, t.already_loaded, t.rejected))
            for t in self.tables
        ]
        if any(t.forgotten for t in self.tables):
            head += ("forgotten",)
            body = [row + (f"{t.forgotten:,}",) for row, t in zip(body, self.tables, strict=True)]
        widths = [max(len(row[i]) for row in (head, *body)) for i in range(len(head))]
        lines = [
            "  ".join(
                cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
            for row in (head, *body)
        ]
        if any(t.rejected for t in self.tables):
            lines.append(
                "Rejected rows are in the warehouse table `rejects`, each with its reason and original values."
            )
        if any(t.forgotten for t in self.tables):
            lines.append("Forgotten rows belong to customers on the suppression list (`engage forget`): dropped.")
        return "\n".join(lines)


def warehouse_path(home: Path) -> Path:
    return Path(home) / WAREHOUSE_FILE


def connect_warehouse(home: Path, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Open the warehouse; unless read_only, create the folder and missing tables."""
    path = warehouse_path(home)
    if read_only:
        con = duckdb.connect(str(path), read_only=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        con = duckdb.connect(str(path))
        con.execute(_schema_sql())
    # Timestamps without an offset are UTC, and TIMESTAMPTZ values print in UTC.
    con.execute("SET TimeZone = 'UTC'")
    return con


def _schema_sql() -> str:
    statements = []
    for table in TABLES.values():
        cols = [
            f"{c.name} {_SQL_TYPES[c.type]}" + (" PRIMARY KEY" if c.name == table.key and table.upsert else "")
            for c in table.columns
        ]
        statements.append(f"CREATE TABLE IF NOT EXISTS {table.name} ({', '.join(cols)}, loaded_at TIMESTAMP)")
    # events and exposures carry no PRIMARY KEY: maintaining the index makes bulk
    # inserts about 3x slower in DuckDB. Their keys stay unique because every
    # insert is deduplicated within the file and anti-joined against the table.
    statements += [
        "CREATE TABLE IF NOT EXISTS profile_columns (name VARCHAR PRIMARY KEY, kind VARCHAR)",
        "CREATE TABLE IF NOT EXISTS rejects (rejected_at TIMESTAMP, table_name VARCHAR, "
        "source_file VARCHAR, row_number BIGINT, reason VARCHAR, original JSON)",
        "CREATE TABLE IF NOT EXISTS loads (load_id VARCHAR, loaded_at TIMESTAMP, table_name VARCHAR, "
        "source_file VARCHAR, rows BIGINT, accepted BIGINT, inserted BIGINT, rejected BIGINT)",
    ]
    return ";\n".join(statements) + ";"


def ingest(src_dir: Path, home: Path) -> IngestReport:
    """Load every contract file in src_dir into the warehouse under home.

    Raises:
        ContractError: a file is missing, not CSV/Parquet, unreadable or lacks a
            required column. Nothing is written then.
    """
    sources = find_sources(Path(src_dir))
    suppressed = _suppression_list(Path(home))
    con = connect_warehouse(Path(home))
    try:
        # Staging only creates temp objects, so it runs before the transaction:
        # a CSV read that fails must be retried, and in DuckDB any error aborts
        # the transaction it happens in.
        staged = [_stage(con, TABLES[name], path) for name, path in sources.items()]
        con.execute("SET preserve_insertion_order = false")  # rows carry their number
        loaded_at = datetime.now(UTC).replace(tzinfo=None)
        load_id = uuid.uuid4().hex
        con.begin()
        try:
            _register_timezones(con)
            for src in staged:
                try:
                    _check(con, src)
                except duckdb.Error as e:
                    # Parquet data is first read here, so a corrupt page shows up now.
                    if _is_parquet(src.path) and not isinstance(e, duckdb.ProgrammingError):
                        raise ContractError(f"{src.path}: cannot read: {e}") from e
                    raise
                src.forgotten = _drop_forgotten(con, src, suppressed)
            reports = [_write(con, src, load_id, loaded_at) for src in staged]
            con.commit()
        except BaseException:
            con.rollback()
            raise
    finally:
        con.close()
    return IngestReport(reports)


# --- finding and staging files ---------------------------------------------------------


def find_sources(src_dir: Path) -> dict[str, Path]:
    """Map each contract table present in src_dir to its file, in load order."""
    if not src_dir.is_dir():
        raise ContractError(f"{src_dir}: not a folder")
    found: dict[str, list[Path]] = {name: [] for name in TABLES}
    for path in sorted(src_dir.iterdir()):
        stem, _, ext = path.name.partition(".")
        if not path.is_file() or stem.lower() not in TABLES:
            continue
        if ext.lower() not in ("csv", "csv.gz", "parquet"):
            raise ContractError(
                f"{path}: not CSV/Parquet; the {stem.lower()} table must be "
                f"{stem.lower()}.csv or {stem.lower()}.parquet"
            )
        found[stem.lower()].append(path)
    sources = {}
    for name, paths in found.items():
        if len(paths) > 1:
            raise ContractError(f"{src_dir}: {' and '.join(p.name for p in paths)} are the same table; keep one")
        if paths:
            sources[name] = paths[0]
        elif TABLES[name].required:
            raise ContractError(f"{src_dir}: {name}.csv or {name}.parquet is required and missing")
    return sources


@dataclass
class _Source:
    table: Table
    path: Path
    raw: str  # temp view: _ROW plus every column under its lower-case name
    types: dict[str, str]  # lower-case column name -> DuckDB type as read
    json_keys: dict[str, str]  # raw view column -> key in rejects.original (the header as written)
    overflow: list[str] = field(default_factory=list)  # CSV fields beyond the header
    extras: list[tuple[str, str, str]] = field(default_factory=list)  # (column, warehouse column, kind)
    forgotten: int = 0  # rows of suppressed customers dropped after the check

    @property
    def chk(self) -> str:
        return f"_chk_{self.table.name}"


def _stage(con: duckdb.DuckDBPyConnection, table: Table, path: Path) -> _Source:
    if path.stat().st_size == 0:
        raise ContractError(f"{path}: the file is empty (0 bytes)")
    raw = f"_raw_{table.name}"
    extra: list[str] = []  # CSV columns that catch fields beyond the header
    if _is_parquet(path):
        source = f"read_parquet({_lit(str(path))}, file_row_number = true)"
        try:
            names = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet({_lit(str(path))})").fetchall()]
        except duckdb.Error as e:
            raise ContractError(f"{path}: not a readable Parquet file: {e}") from e
        columns = [(n, n) for n in names]  # (column as read, header as written)
        row = "file_row_number + 1"
    else:
        source, columns, extra = _stage_csv(con, table, path)
        row = "rowid + 1"

    lowered = [name.strip().lower() for _, name in columns]
    for name in lowered:
        if name and lowered.count(name) > 1:
            raise ContractError(f"{path}: column '{name}' appears twice (column names are matched lower-case)")
    # View columns: the lower-case name; a field without a name or beyond the
    # header (ragged CSV rows) is _field_<position>.
    view = [
        (col, name or f"_field_{i}", header or f"_field_{i}")
        for i, ((col, header), name) in enumerate(zip(columns, lowered, strict=True), start=1)
    ]
    overflow = [f"_field_{i}" for i in range(len(columns) + 1, len(columns) + len(extra) + 1)]
    view += [(col, name, name) for col, name in zip(extra, overflow, strict=True)]
    select = ", ".join([f"{row} AS {_ROW}"] + [f"{_q(col)} AS {_q(name)}" for col, name, _ in view])
    con.execute(f"CREATE OR REPLACE TEMP VIEW {raw} AS SELECT {select} FROM {source}")
    # DuckDB keeps a column's own spelling when the alias differs only in case.
    described = {
        n.lower(): t for n, t in con.execute(f"SELECT column_name, column_type FROM (DESCRIBE {raw})").fetchall()
    }
    types = {name: described[name] for name in lowered if name}

    missing = [c.name for c in table.columns if c.required and c.name not in types]
    if missing:
        raise ContractError(
            f"{path}: required column{'s' if len(missing) > 1 else ''} {', '.join(missing)} missing "
            f"(the file has: {', '.join(header for _, header in columns)})"
        )
    json_keys = {name: key for _, name, key in view}
    src = _Source(table, path, raw, types, json_keys, overflow)
    if table.extra_columns:
        src.extras = _profile_columns(con, src)
    return src


def _stage_csv(
    con: duckdb.DuckDBPyConnection, table: Table, path: Path
) -> tuple[str, list[tuple[str, str]], list[str]]:
    """Read a CSV into a temp table of VARCHARs c1..cN whose rowid is the row number.

    The header is read in Python and the dialect is fixed, so DuckDB's sniffer
    never guesses: it would take a leading '#' for a comment (dropping rows
    silently), skip lines it finds odd, or rename columns.
    """
    header = _csv_header(path)
    target = f"_csv_{table.name}"

    def read(n_columns: int, options: str = "") -> None:
        columns = ", ".join(f"'c{i}': 'VARCHAR'" for i in range(1, n_columns + 1))
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE {target} AS SELECT * FROM read_csv({_lit(str(path))}, "
            f"{_CSV_OPTIONS}, columns = {{{columns}}}{options})"
        )

    con.execute("SET preserve_insertion_order = true")  # rowid must follow the file
    spare = 0
    try:
        read(len(header))
    except duckdb.Error:
        # Rows with more or fewer fields than the header. DuckDB pads short rows
        # (missing fields become empty values), but only on one thread; a few spare
        # columns catch the surplus fields of long rows, which are then rejected.
        spare = _CSV_SPARE_FIELDS
        try:
            read(len(header) + spare, ", null_padding = true, parallel = false")
        except duckdb.Error as e:
            raise ContractError(f"{path}: not a readable CSV file: {e}") from e
    columns = [(f"c{i}", name) for i, name in enumerate(header, start=1)]
    return target, columns, [f"c{i}" for i in range(len(header) + 1, len(header) + spare + 1)]


def _csv_header(path: Path) -> list[str]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f), None)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
        raise ContractError(f"{path}: cannot read the header row: {e}") from e
    if not header or not any(h.strip() for h in header):
        raise ContractError(f"{path}: no header row (the first line must name the columns)")
    return header


def _profile_columns(con: duckdb.DuckDBPyConnection, src: _Source) -> list[tuple[str, str, str]]:
    """Extra customer columns as (column, warehouse column, 'numeric' | 'categorical').

    A column keeps the kind it was first loaded with; a new one is numeric when it
    is a number in Parquet, or when every non-empty CSV value parses as a number.
    """
    known = dict(con.execute("SELECT name, kind FROM profile_columns").fetchall())
    contract = {c.name for c in src.table.columns}
    extras, taken = [], set(contract) | {"loaded_at"}
    for col, ty in src.types.items():
        if col in contract or _IGNORED_EXTRA.fullmatch(col):
            continue
        name = re.sub(r"[^0-9a-z_]+", "_", col).strip("_")
        name = name if name and not name[0].isdigit() else f"p_{name}"
        if name in taken:
            raise ContractError(f"{src.path}: extra column '{col}' would be stored as '{name}', which is taken")
        taken.add(name)
        if name in known:
            kind = known[name]
        elif _is_numeric(ty):
            kind = "numeric"
        elif ty == "VARCHAR":
            text = f"NULLIF(TRIM({_q(col)}), '')"
            present, numbers = _one(con, f"SELECT count({text}), count(TRY_CAST({text} AS DOUBLE)) FROM {src.raw}")
            kind = "numeric" if present and present == numbers else "categorical"
        else:
            kind = "categorical"
        extras.append((col, name, kind))
    return extras


# --- checking rows -------------------------------------------------------------------------


def _register_timezones(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("CREATE OR REPLACE TEMP TABLE _engage_tz (key VARCHAR, name VARCHAR)")
    names = sorted(zoneinfo.available_timezones() | {"UTC"})
    con.execute("INSERT INTO _engage_tz SELECT lower(n), n FROM unnest(?::VARCHAR[]) AS t(n)", [names])


def _check(con: duckdb.DuckDBPyConnection, src: _Source) -> None:
    """Create src.chk: row number, typed warehouse columns and a reason ('' = good)."""
    table = src.table
    typed, problems, outputs = [f"r.{_ROW} AS _row"], [], []
    for col in table.columns:
        ty = src.types.get(col.name)
        if ty is None:  # an optional column the file does not have
            typed.append(f"CAST(NULL AS {_SQL_TYPES[col.type]}) AS {_q(col.name)}")
        else:
            typed += [
                f"{_typed(col, f'r.{_q(col.name)}', ty)} AS {_q(col.name)}",
                f"{_as_read(f'r.{_q(col.name)}', ty)} AS {_q('_raw_' + col.name)}",
            ]
            problems.append(_problem(col, col.name, ty))
        value = f"v.{_q(col.name)}"
        if col.default is not None:
            value = f"coalesce({value}, {_lit(col.default)})"
        if table.derive_key and col.name == table.key:
            fingerprint = ", ".join(_canonical(c) for c in table.columns if c.name != table.key)
            value = f"coalesce({value}, md5(concat_ws(chr(31), {fingerprint})))"
        outputs.append(f"{value} AS {_q(col.name)}")
    for read_as, name, kind in src.extras:
        spec = Column(name, "number" if kind == "numeric" else "string")
        typed += [
            f"{_typed(spec, f'r.{_q(read_as)}', src.types[read_as])} AS {_q(name)}",
            f"{_as_read(f'r.{_q(read_as)}', src.types[read_as])} AS {_q('_raw_' + name)}",
        ]
        problems.append(_problem(spec, read_as, src.types[read_as], raw=name))
        outputs.append(f"v.{_q(name)}")
    if src.overflow:
        typed.append(f"coalesce({', '.join(f'r.{_q(c)}' for c in src.overflow)}) IS NOT NULL AS _overflow")
        problems.append("CASE WHEN v._overflow THEN 'the row has more fields than the header' END")

    joins = ""
    if table.customer_ref:
        joins = "LEFT JOIN _engage_known k ON k.customer_id = v.customer_id"
        problems.append(
            "CASE WHEN v.customer_id IS NOT NULL AND k.customer_id IS NULL "
            "THEN 'customer_id ''' || v.customer_id || ''' is not in customers' END"
        )
    if table.not_before_signup:
        ts = _q(table.not_before_signup)
        problems.append(
            f"CASE WHEN v.{ts} < k.signup_at THEN {_lit(table.not_before_signup + ' ')} || v.{ts} "
            "|| ' is before the customer''s signup_at ' || k.signup_at || ' (the customer did not exist yet)' END"
        )
    if table.derive_key:
        outputs.append(f"v.{_q(table.key)} IS NULL AS _derived")
    reason = f"concat_ws('; ', {', '.join(problems)})" if problems else "''"
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {src.chk} AS "
        f"WITH v AS (SELECT {', '.join(typed)} FROM {src.raw} r) "
        f"SELECT v._row, {', '.join(outputs)}, {reason} AS _reason FROM v {joins}"
    )
    _reject_duplicates(con, src)
    if table.name == "customers":
        # Who events and exposures may refer to: this load's good customers, and
        # the warehouse's for everyone else.
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE _engage_known AS "
            f"SELECT customer_id, signup_at FROM {src.chk} WHERE _reason = '' "
            f"UNION ALL SELECT customer_id, signup_at FROM customers w WHERE NOT EXISTS "
            f"(SELECT 1 FROM {src.chk} c WHERE c._reason = '' AND c.customer_id = w.customer_id)"
        )


def _suppression_list(home: Path):
    """The customers forgotten with `engage forget`; it lives in the serving database (serving.suppression).

    Raises:
        OSError (SuppressionError): the list cannot be read; nothing is loaded then.
    """
    from serving.suppression import open_list

    return open_list(home)


def _drop_forgotten(con: duckdb.DuckDBPyConnection, src: _Source, suppressed) -> int:
    """Delete the checked rows of suppressed customers, good or bad (a rejected row would keep their id in
    `rejects`); returns how many."""
    if not len(suppressed) or not (src.table.customer_ref or src.table.name == "customers"):
        return 0
    ids = [r[0] for r in con.execute(f"SELECT DISTINCT customer_id FROM {src.chk} WHERE customer_id IS NOT NULL")
           .fetchall()]
    gone = suppressed.matching(ids)
    if not gone:
        return 0
    (n,) = _one(con, f"DELETE FROM {src.chk} WHERE customer_id IN (SELECT unnest(?::VARCHAR[]))", [gone])
    return int(n)


def _reject_duplicates(con: duckdb.DuckDBPyConnection, src: _Source) -> None:
    """Among otherwise good rows with the same key, the first in the file wins."""
    key, chk = _q(src.table.key), src.chk
    message = f"'duplicate {src.table.key} ''' || c.{key} || ''' (row ' || d.first || ' has it first)'"
    if src.table.derive_key:
        fields = ", ".join(c.name for c in src.table.columns if c.name != src.table.key)
        message = (
            f"CASE WHEN c._derived THEN 'duplicate of row ' || d.first || ' (no {src.table.key}; "
            f"same {fields})' ELSE {message} END"
        )
    con.execute(
        f"UPDATE {chk} c SET _reason = {message} "
        f"FROM (SELECT {key}, min(_row) AS first FROM {chk} WHERE _reason = '' GROUP BY {key} HAVING count(*) > 1) d "
        f"WHERE c.{key} = d.{key} AND c._reason = '' AND c._row > d.first"
    )


def _typed(col: Column, x: str, ty: str) -> str:
    """SQL for the typed value of raw column x read as DuckDB type ty; NULL when empty or invalid."""
    text = _as_read(x, ty) if ty == "VARCHAR" else f"NULLIF(TRIM(CAST({x} AS VARCHAR)), '')"
    if col.type == "string":
        return text
    if col.type == "enum":
        return f"lower({text})"
    if col.type == "list":
        split = f"string_split({f'lower({text})' if col.allowed else text}, ';')"
        items = f"list_filter(list_transform({split}, lambda t: trim(t)), lambda t: t <> '')"
        return f"NULLIF(array_to_string({items}, ';'), '')"
    if col.type == "timezone":
        return f"(SELECT min(name) FROM _engage_tz WHERE key = lower({text}))"
    if col.type == "timestamp":
        if ty in ("TIMESTAMP WITH TIME ZONE", "TIMESTAMPTZ_NS"):  # pandas writes tz-aware times in nanoseconds
            return f"(CAST({x} AS TIMESTAMPTZ) AT TIME ZONE 'UTC')"
        if ty.startswith("TIMESTAMP") or ty == "DATE":
            return f"CAST({x} AS TIMESTAMP)"
        return f"(TRY_CAST({text} AS TIMESTAMPTZ) AT TIME ZONE 'UTC')"
    if col.type == "number":
        if ty in _FLOAT_TYPES:  # NaN is how data frames spell a missing number
            return f"CASE WHEN isnan({x}) THEN NULL ELSE CAST({x} AS DOUBLE) END"
        if _is_numeric(ty):
            return f"CAST({x} AS DOUBLE)"
        return f"TRY_CAST({text} AS DOUBLE)"
    if col.type == "bool":
        if ty == "BOOLEAN":
            return x
        if _is_numeric(ty):
            return f"CASE WHEN {x} = 1 THEN true WHEN {x} = 0 THEN false END"
        return (
            f"CASE WHEN lower({text}) IN ({_list(BOOL_TRUE)}) THEN true "
            f"WHEN lower({text}) IN ({_list(BOOL_FALSE)}) THEN false END"
        )
    raise ValueError(f"unknown column type {col.type!r}")


def _problem(col: Column, label: str, ty: str, raw: str | None = None) -> str:
    """SQL for what is wrong with one value of col (NULL if nothing), over the CTE v."""
    v, x = f"v.{_q(col.name)}", f"v.{_q('_raw_' + (raw or col.name))}"
    if col.type == "number" and ty in _FLOAT_TYPES:
        empty = f"({x} IS NULL OR isnan({x}))"
    else:
        empty = f"{x} IS NULL"
    shown = f"{_lit(label + ' ' + chr(39))} || left(CAST({x} AS VARCHAR), 80) || {_lit(chr(39) + ' ')}"

    whens = []
    if col.required:
        whens.append(f"WHEN {empty} THEN {_lit(label + ' is empty')}")
    elif col.required_if:
        other, value = col.required_if
        whens.append(
            f"WHEN {empty} AND v.{_q(other)} = {_lit(value)} "
            f"THEN {_lit(f'{label} is required when {other} is {value!r}')}"
        )
    whens.append(f"WHEN {empty} THEN NULL")
    if col.type in ("timestamp", "number"):
        what = "an ISO 8601 timestamp" if col.type == "timestamp" else "a number"
        whens.append(f"WHEN {v} IS NULL OR NOT isfinite({v}) THEN {shown} || {_lit('is not ' + what)}")
    elif col.type == "bool":
        whens.append(f"WHEN {v} IS NULL THEN {shown} || {_lit('is not a boolean (true/false, 1/0, yes/no)')}")
    elif col.type == "enum":
        whens.append(
            f"WHEN {v} NOT IN ({_list(col.allowed)}) THEN {shown} || {_lit('is not one of ' + ', '.join(col.allowed))}"
        )
    elif col.type == "list" and col.allowed:
        unknown = f"list_filter(string_split({v}, ';'), lambda t: t NOT IN ({_list(col.allowed)}))"
        whens.append(
            f"WHEN len({unknown}) > 0 THEN {shown} || 'has ' || array_to_string({unknown}, ', ') "
            f"|| {_lit(', not one of ' + ', '.join(col.allowed))}"
        )
    elif col.type == "timezone":
        whens.append(f"WHEN {v} IS NULL THEN {shown} || 'is not an IANA time zone name (like Europe/Berlin or UTC)'")
    if col.check == ">= 0":
        whens.append(f"WHEN {v} < 0 THEN {shown} || 'is negative'")
    elif col.check == "(0, 1]":
        whens.append(f"WHEN NOT ({v} > 0 AND {v} <= 1) THEN {shown} || 'is not in (0, 1]'")
    return f"CASE {' '.join(whens)} END"


def _as_read(x: str, ty: str) -> str:
    """A value as read, with text trimmed and empty text as NULL.

    The typed value of a text column starts from the same expression, which DuckDB
    then computes once.
    """
    return f"NULLIF(TRIM({x}), '')" if ty == "VARCHAR" else x


def _canonical(col: Column) -> str:
    """A column's value as stable text, for deriving a key from a row."""
    v = f"v.{_q(col.name)}"
    if col.type == "timestamp":
        v = f"strftime({v}, '%Y-%m-%dT%H:%M:%S.%f')"
    elif col.type == "number":
        v = f"printf('%.6f', {v})"
    elif col.type == "bool":
        v = f"CAST({v} AS VARCHAR)"
    return f"coalesce({v}, '')"


# --- writing -----------------------------------------------------------------------------


def _write(con: duckdb.DuckDBPyConnection, src: _Source, load_id: str, loaded_at: datetime) -> TableReport:
    table, chk = src.table, src.chk
    key = _q(table.key)
    rows, accepted = _one(con, f"SELECT count(*), count(*) FILTER (WHERE _reason = '') FROM {chk}")
    known = {name for (name,) in con.execute("SELECT name FROM profile_columns").fetchall()}
    for _, name, kind in src.extras:
        if name not in known:
            con.execute(f"ALTER TABLE customers ADD COLUMN {_q(name)} {'DOUBLE' if kind == 'numeric' else 'VARCHAR'}")
            con.execute("INSERT INTO profile_columns VALUES (?, ?)", [name, kind])
    names = [c.name for c in table.columns] + [name for _, name, _ in src.extras]
    cols = ", ".join(_q(c) for c in names)
    good = f"FROM {chk} c WHERE c._reason = ''"
    stored = f"EXISTS (SELECT 1 FROM {table.name} w WHERE w.{key} = c.{key})"
    if table.upsert:
        # A stored row takes this file's values; profile columns the file lacks keep
        # theirs. (DELETE + INSERT of the same keys is ~10x slower to commit in DuckDB.)
        (already,) = _one(con, f"SELECT count(*) {good} AND {stored}")
        updates = ", ".join(f"{_q(c)} = excluded.{_q(c)}" for c in [*names, "loaded_at"] if c != table.key)
        con.execute(
            f"INSERT INTO {table.name} ({cols}, loaded_at) SELECT {cols}, ? {good} "
            f"ON CONFLICT ({key}) DO UPDATE SET {updates}",
            [loaded_at],
        )
        inserted = accepted - already
    else:
        (inserted,) = _one(
            con, f"INSERT INTO {table.name} ({cols}, loaded_at) SELECT {cols}, ? {good} AND NOT {stored}", [loaded_at]
        )
    if rows > accepted:
        original = ", ".join(f"{_lit(k)}, r.{_q(c)}" for c, k in src.json_keys.items())
        con.execute(
            f"INSERT INTO rejects SELECT ?, ?, ?, c._row, c._reason, json_object({original}) "
            f"FROM {chk} c JOIN {src.raw} r ON r.{_ROW} = c._row WHERE c._reason <> ''",
            [loaded_at, table.name, str(src.path)],
        )
    report = TableReport(table.name, str(src.path), rows, accepted, inserted, accepted - inserted, rows - accepted,
                         src.forgotten)
    con.execute(
        "INSERT INTO loads VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [load_id, loaded_at, table.name, str(src.path), rows, accepted, inserted, rows - accepted],
    )
    return report


# --- SQL text helpers ----------------------------------------------------------------------


def _one(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> tuple:
    """The single row of an aggregate query or the count row of an INSERT."""
    row = con.execute(sql, params or []).fetchone()
    assert row is not None, sql
    return row


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _lit(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(float(value))
    return "'" + str(value).replace("'", "''") + "'"


def _list(values: tuple[str, ...]) -> str:
    return ", ".join(_lit(v) for v in values)


def _is_parquet(path: Path) -> bool:
    return path.name.lower().endswith(".parquet")


def _is_numeric(ty: str) -> bool:
    return ty in _INT_TYPES or ty in _FLOAT_TYPES or ty.startswith("DECIMAL")
