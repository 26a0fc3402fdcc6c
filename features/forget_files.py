"""Files under ENGAGE_HOME that hold customer rows: find them, rewrite them without some customers, and look
for ids left in any other readable file.

A *table file* is a Parquet, CSV or CSV.gz file with a ``customer_id`` column (any case): the feature
snapshots, the simulator's ground truth, win-back lists (``scores/``, Spark part files too) and any export
kept in the home (the demo's ``data/simulated/``). :func:`rewrite_without` replaces such a file atomically
(a temporary file in the same folder, fsynced, then renamed), keeping its schema, metadata, compression and
row groups, so a crash leaves the old file or the new one, never a mix; a file without the ids is not touched.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import mmap
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ID_COLUMN = "customer_id"
TABLE_SUFFIXES = (".parquet", ".csv", ".csv.gz")
_TEXT_PROBE = 8192
_MAX_TEXT_BYTES = 256 * 2**20  # larger files are data, not text someone kept by hand


def is_table_file(path: Path) -> bool:
    return path.name.lower().endswith(TABLE_SUFFIXES) and not _is_temporary(path)


def _is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".tmp")


def files_under(home: Path) -> Iterator[Path]:
    """Every regular file under ``home`` (symlinks are not followed), in a stable order."""
    for root, dirs, names in os.walk(home):
        dirs.sort()
        for name in sorted(names):
            path = Path(root) / name
            if path.is_file() and not path.is_symlink():
                yield path


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def _is_parquet(path: Path) -> bool:
    """By content, not name: a file may be checked under a temporary name (see features/truth.py)."""
    return _magic(path) == b"PAR1"


def _open_text(path: Path, mode: str = "r", gz: bool | None = None):
    gz = _magic(path)[:2] == b"\x1f\x8b" if gz is None else gz
    return (gzip.open if gz else open)(path, mode + "t", newline="", encoding="utf-8")


def id_column(path: Path) -> str | None:
    """The file's ``customer_id`` column as spelled in it, or None (also for an unreadable file)."""
    try:
        if _is_parquet(path):
            names = pq.read_schema(path).names
        else:
            with _open_text(path) as f:
                names = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, pa.ArrowException, csv.Error):
        return None
    return next((n for n in names if n.strip().lower() == ID_COLUMN), None)


def file_customer_ids(path: Path) -> list[str]:
    """The distinct customer ids of a table file (trimmed), [] when it has no ``customer_id`` column."""
    column = id_column(path)
    if column is None:
        return []
    if _is_parquet(path):
        values = pc.unique(_keys(pq.read_table(path, columns=[column]).column(column)))
        return [v for v in values.to_pylist() if v]
    with _open_text(path) as f:
        reader = csv.reader(f)
        at = next(reader).index(column)
        return list(dict.fromkeys(row[at].strip() for row in reader if len(row) > at and row[at].strip()))


def _keys(column: pa.ChunkedArray) -> pa.ChunkedArray:
    return pc.utf8_trim_whitespace(pc.cast(column, pa.string()))


def rewrite_without(path: Path, ids: set[str]) -> int:
    """Rewrite a table file without the rows whose ``customer_id`` is in ``ids``; returns rows removed."""
    column = id_column(path)
    if column is None or not ids:
        return 0
    if _is_parquet(path):
        removed = _rewrite_parquet(path, column, ids)
    else:
        removed = _rewrite_csv(path, column, ids)
    if removed:
        # Hadoop/Spark checksum of the old bytes: a stale one would make Spark refuse the new file.
        path.with_name(f".{path.name}.crc").unlink(missing_ok=True)
    return removed


def _rewrite_parquet(path: Path, column: str, ids: set[str]) -> int:
    value_set = pa.array(sorted(ids), pa.string())

    def gone(table: pa.Table) -> pa.ChunkedArray:
        return pc.fill_null(pc.is_in(_keys(table.column(column)), value_set=value_set), False)

    removed = pc.sum(gone(pq.read_table(path, columns=[column]))).as_py() or 0
    if not removed:
        return 0
    pf = pq.ParquetFile(path)
    meta = pf.metadata
    compression = meta.row_group(0).column(0).compression.lower() if meta.num_row_groups and meta.num_columns \
        else "zstd"
    with _replacing(path) as tmp:
        with pq.ParquetWriter(tmp, pf.schema_arrow, compression=compression) as writer:
            for i in range(meta.num_row_groups):
                part = pf.read_row_group(i)
                writer.write_table(part.filter(pc.invert(gone(part))))
    return int(removed)


def _rewrite_csv(path: Path, column: str, ids: set[str]) -> int:
    with _open_text(path) as f:
        text = f.read()
    newline = "\r\n" if "\r\n" in text[: text.find("\n") + 1] else "\n"
    rows = list(csv.reader(io.StringIO(text, newline="")))
    at = rows[0].index(column)
    kept = [rows[0]] + [r for r in rows[1:] if not (len(r) > at and r[at].strip() in ids)]
    removed = len(rows) - len(kept)
    if removed:
        with _replacing(path) as tmp, _open_text(tmp, "w", gz=_magic(path)[:2] == b"\x1f\x8b") as out:
            csv.writer(out, lineterminator=newline).writerows(kept)
    return removed


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it (fsynced) when the block succeeds."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.forget.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # the rename itself durable (not every filesystem allows it)
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        tmp.unlink(missing_ok=True)


def id_pattern(ids: Iterable[str]) -> re.Pattern[bytes]:
    """Any of ``ids`` as a whole token (not inside a longer id: C1 does not match C10)."""
    alternatives = b"|".join(re.escape(i.encode("utf-8")) for i in sorted(ids, key=len, reverse=True))
    return re.compile(rb"(?<![\w-])(?:" + alternatives + rb")(?![\w-])")


def is_text_file(path: Path) -> bool:
    """Small enough, and its start is UTF-8 without NUL bytes (JSON, YAML, logs, MLmodel files, notes)."""
    try:
        if path.stat().st_size > _MAX_TEXT_BYTES:
            return False
        with open(path, "rb") as f:
            head = f.read(_TEXT_PROBE)
    except OSError:
        return False
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:  # a multi-byte character cut at the end of the probe is still text
        return exc.start >= len(head) - 3
    return True


def text_files_holding(home: Path, ids: Iterable[str], skip: Iterable[Path] = ()) -> list[Path]:
    """Files under ``home`` (but ``skip``) still holding any of ``ids``: text files where one appears as a
    token, and temporary table files (``.name.tmp``, left by an interrupted write) with their rows."""
    wanted = set(ids)
    pattern, skipped = id_pattern(wanted), {Path(p).resolve() for p in skip}
    found = []
    for path in files_under(home):
        if path.resolve() in skipped or not path.stat().st_size:
            continue
        if _is_temporary(path) and id_column(path) is not None:  # left by an interrupted (or running) write
            if wanted & set(file_customer_ids(path)):
                found.append(path)
            continue
        if not is_text_file(path):
            continue
        if is_table_file(path) and id_column(path) is not None:  # rewritten by its customer_id column
            continue
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if pattern.search(data):
                found.append(path)
    return found
