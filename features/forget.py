"""The right to be forgotten: remove customers from every store Engage keeps, and suppress them for good.

:func:`forget` runs, for a list of customer ids:

1. **Check** (reads only): which ids any store knows (warehouse, Feast online store, serving database,
   table files under ENGAGE_HOME) or the suppression list already holds. An id none of them knows is an
   error (nothing is changed) unless ``allow_unknown``: then it is suppressed too, so a later load of it
   is dropped.
2. **Suppress** first (``serving.suppression``: a keyed hash, never the id), so a run interrupted after this
   step still stops the service from answering for them, and ingest from loading them again.
3. **Remove**, store by store, each step idempotent: the serving database (decision log, feedback), the
   online store (SQLite rows or Redis keys), the warehouse (customers, events, exposures, rejects; then
   compacted), and every table file under ENGAGE_HOME with a ``customer_id`` column (feature snapshots,
   ground truth, win-back lists, exports kept there), each rewritten atomically without their rows.
4. **Look** for the ids in every other text file under ENGAGE_HOME (JSON, YAML, logs, MLflow's MLmodel and
   input examples when the MLflow store lives there): files still holding one are reported, not edited.

A second run of the same ids removes nothing and reports them as already suppressed; a run interrupted
anywhere is finished by running it again.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from features import forget_files as files
from features import forget_stores as stores
from features.forget_stores import StoreResult


class ForgetError(ValueError):
    """Forget cannot run (no ids, unreadable id file, store unreachable); nothing was changed."""


class UnknownCustomers(ForgetError):
    """Ids that no store knows and that are not suppressed (pass ``allow_unknown`` to suppress them anyway)."""

    def __init__(self, ids: Sequence[str]):
        self.ids = list(ids)
        shown = ", ".join(self.ids[:10]) + (f" and {len(self.ids) - 10:,} more" if len(self.ids) > 10 else "")
        super().__init__(f"unknown customer id{'s' if len(self.ids) > 1 else ''}: {shown} (in no store and not "
                         "suppressed; nothing was changed; pass --allow-unknown to suppress them anyway)")


@dataclass
class ForgetReport:
    customers: int  # distinct ids asked for
    newly_suppressed: int
    already_suppressed: int
    unknown: int  # suppressed although no store knew them (allow_unknown)
    stores: list[StoreResult] = field(default_factory=list)
    leftovers: list[Path] = field(default_factory=list)  # text files still holding an id

    @property
    def removed(self) -> int:
        return sum(s.removed for s in self.stores)


def clean_ids(ids: Iterable[str]) -> list[str]:
    """Trimmed, non-empty, each once (in order)."""
    return list(dict.fromkeys(i.strip() for i in ids if i and i.strip()))


def read_id_file(path: Path) -> list[str]:
    """One id per line; blank lines and lines starting with ``#`` are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ForgetError(f"cannot read the id file {path}: {reason}") from exc
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def forget(home: Path, customer_ids: Iterable[str], *, allow_unknown: bool = False) -> ForgetReport:
    """Forget ``customer_ids`` in every store of ``home`` (see the module docstring).

    Raises:
        ForgetError: no ids, or a store cannot be read; UnknownCustomers: ids no store knows.
    """
    from serving.servingdb import create_serving_engine, serving_db_url
    from serving.suppression import SuppressionList

    home = Path(home)
    ids = clean_ids(customer_ids)
    if not ids:
        raise ForgetError("no customer ids given: name them as arguments or in a file with --from-file")
    if not home.is_dir():
        raise ForgetError(f"ENGAGE_HOME {home} is not a folder")
    engine = create_serving_engine(serving_db_url(home), create=False)
    try:
        listed = SuppressionList(engine, home)
        if not listed.refresh():
            raise ForgetError(f"cannot read the suppression list: {listed.error}")
        try:
            known = _known(home, engine, ids) | set(listed.matching(ids))
        except ValueError as exc:  # e.g. an online store type forget cannot clean: stop before changing anything
            raise ForgetError(str(exc)) from exc
        unknown = [c for c in ids if c not in known]
        if unknown and not allow_unknown:
            raise UnknownCustomers(unknown)

        new, already = listed.add(ids)
        report = ForgetReport(len(ids), new, already, len(unknown))
        report.stores.append(stores.remove_from_serving_db(engine, ids))
    finally:
        engine.dispose()
    report.stores.append(stores.remove_from_online_store(home, ids))
    report.stores.append(stores.remove_from_warehouse(home, ids))
    report.stores += _remove_from_files(home, set(ids))
    report.leftovers = files.text_files_holding(home, ids)
    return report


def _known(home: Path, engine, ids: Sequence[str]) -> set[str]:
    """The ids some store holds (read only)."""
    found = (stores.find_in_warehouse(home, ids) | stores.find_in_serving_db(engine, ids)
             | stores.find_in_online_store(home, ids))
    wanted = set(ids)
    for path in files.files_under(home):
        if len(found) == len(wanted):
            break
        if files.is_table_file(path):
            found |= wanted & set(files.file_customer_ids(path))
    return found


def _file_group(home: Path, path: Path) -> str:
    rel = path.relative_to(home)
    if rel.parts[0] == "feature_data":
        return "feature snapshots"
    if rel.parts[0] == "scores":
        return "win-back lists (scores/)"
    if rel.name == "ground_truth.parquet":
        return "simulated ground truth"
    return "other table files"


def _remove_from_files(home: Path, ids: set[str]) -> list[StoreResult]:
    """Rewrite every table file under ``home`` that holds the ids; one result per kind of file.

    Files are rewritten by a few threads at once (Arrow decodes and encodes without holding the GIL): a
    home keeps one snapshot per week of history, and each is read and written whole.
    """
    paths = [p for p in files.files_under(home) if files.is_table_file(p)]
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        removed_per_file = list(pool.map(lambda p: files.rewrite_without(p, ids), paths))
    groups: dict[str, list[int]] = {}  # group -> [files rewritten, rows removed]
    for path, removed in zip(paths, removed_per_file, strict=True):
        group = groups.setdefault(_file_group(home, path), [0, 0])
        group[0] += bool(removed)
        group[1] += removed
    return [StoreResult(name, rows, f"{n:,} file{'s' if n != 1 else ''} rewritten") for name, (n, rows)
            in groups.items()]
