"""The suppression list: customers who asked to be forgotten (`engage forget`), kept without their ids.

An entry is the hex HMAC-SHA256 of the customer id under a secret key, so the list can say "this id is
suppressed" when asked about an id, but searching any store for a forgotten id finds nothing, and a copy of
the list alone cannot be turned back into ids (customer ids are short and guessable: a plain hash could
be reversed by hashing every candidate; without the key it cannot).

- **Where:** table ``suppressions`` in the serving database (``ENGAGE_SERVING_DB_URL``: SQLite under
  ``ENGAGE_HOME`` by default, PostgreSQL under the production profile), the one store every scoring
  worker, batch job and ingest already reaches.
- **Key:** ``ENGAGE_SUPPRESSION_KEY`` (16+ characters) when set, else ``$ENGAGE_HOME/suppression.key``
  (made by the first ``engage forget``, readable by its owner only). Every entry records the key's check
  value (``key_id``, an HMAC of a fixed text, not the key), so a process with another key or none refuses
  the list with a clear error instead of silently suppressing nobody.
- **Who reads it:** the scoring service (loaded at start and on every registry check, so within
  ``ENGAGE_RELOAD_INTERVAL_S``), batch scoring and ingest (which drop listed customers).

Ids are compared after trimming spaces, as the loader stores them.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from serving.servingdb import UTCDateTime, create_serving_engine, serving_db_url, upsert

log = logging.getLogger(__name__)

KEY_ENV = "ENGAGE_SUPPRESSION_KEY"
KEY_FILE = "suppression.key"
MIN_KEY_CHARS = 16
_KEY_CHECK = b"engage suppression list key check"

metadata = sa.MetaData()
suppressions = sa.Table(
    "suppressions",
    metadata,
    sa.Column("id_hash", sa.String(64), primary_key=True),  # hex HMAC-SHA256(key, customer id)
    sa.Column("key_id", sa.String(16), nullable=False),  # check value of the key that made id_hash
    sa.Column("suppressed_at", UTCDateTime(), nullable=False),
)


class SuppressionError(OSError):
    """The suppression list cannot be read or written: database unreachable, no key, or another key.

    An ``OSError``, like the other failures to reach a store, so every command that reports those in one line
    (``ingest``, ``score``) reports this one the same way.
    """


class IdHasher:
    """HMAC-SHA256 of customer ids under one key."""

    def __init__(self, key: bytes):
        self._mac = hmac.new(key, digestmod=hashlib.sha256)
        self.key_id = hmac.new(key, _KEY_CHECK, hashlib.sha256).hexdigest()[:16]

    def __call__(self, customer_id: str) -> str:
        mac = self._mac.copy()
        mac.update(customer_id.strip().encode("utf-8"))
        return mac.hexdigest()


def load_key(home: Path, *, create: bool = False) -> bytes | None:
    """The key: ``ENGAGE_SUPPRESSION_KEY``, else ``home/suppression.key``; made there when missing and ``create``."""
    env = os.environ.get(KEY_ENV, "").strip()
    if env:
        if len(env) < MIN_KEY_CHARS:
            raise SuppressionError(f"{KEY_ENV} must be at least {MIN_KEY_CHARS} characters")
        return env.encode("utf-8")
    path = Path(home) / KEY_FILE
    if not path.exists():
        if not create:
            return None
        _create_key_file(path)
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise SuppressionError(f"cannot read the suppression key {path}: {exc.strerror or exc}") from exc
    if len(text) < MIN_KEY_CHARS:
        raise SuppressionError(f"the suppression key {path} is shorter than {MIN_KEY_CHARS} characters")
    return text.encode("utf-8")


def _create_key_file(path: Path) -> None:
    """A new random key, owner-only; written under a temporary name and linked into place, so two first
    forgets at once agree on one key (the second link fails and its key is dropped)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


class SuppressionList:
    """The list stored in one serving database; :meth:`refresh` (re)loads it.

    ``in`` and :meth:`matching` answer for raw ids. A failed refresh keeps the last good list and sets
    ``error``; ``loaded`` is false until one refresh succeeded (the service is not ready before).
    """

    def __init__(self, engine: Engine, home: Path):
        self.engine, self.home = engine, Path(home)
        self.loaded = False
        self.error: str | None = None
        self._hashes: frozenset[str] = frozenset()
        self._hasher: IdHasher | None = None
        self._token: tuple | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._hashes)

    def __contains__(self, customer_id: object) -> bool:
        hashes, hasher = self._hashes, self._hasher
        return bool(hashes) and isinstance(customer_id, str) and hasher is not None and hasher(customer_id) in hashes

    def matching(self, customer_ids: Iterable[str]) -> list[str]:
        """The ids among ``customer_ids`` that are on the list (each once, in first-seen order)."""
        hashes, hasher = self._hashes, self._hasher
        if not hashes or hasher is None:
            return []
        return [c for c in dict.fromkeys(customer_ids) if isinstance(c, str) and hasher(c) in hashes]

    def refresh(self) -> bool:
        """Reload when the stored list changed (count or newest entry); False and ``error`` set on failure."""
        with self._lock:
            try:
                if not sa.inspect(self.engine).has_table(suppressions.name):
                    self._hashes, self._token = frozenset(), None
                else:
                    with self.engine.connect() as con:
                        token = tuple(con.execute(sa.select(sa.func.count(),
                                                            sa.func.max(suppressions.c.suppressed_at))).one())
                        if token != self._token:
                            rows = con.execute(sa.select(suppressions.c.id_hash, suppressions.c.key_id)).all()
                            self._hasher = _hasher_for(self.home, {k for _, k in rows}, len(rows))
                            self._hashes, self._token = frozenset(h for h, _ in rows), token
                self.loaded, self.error = True, None
                return True
            except Exception as exc:  # noqa: BLE001 - unreachable, no key, another key: keep the last good list
                self.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                log.error("suppression list not refreshed (%d entries kept): %s", len(self._hashes), self.error)
                return False

    def add(self, customer_ids: Iterable[str]) -> tuple[int, int]:
        """Put ids on the list (the key is made on first use); returns (newly added, already there)."""
        hasher = IdHasher(load_key(self.home, create=True))  # type: ignore[arg-type]
        _create_table(self.engine)
        with self.engine.connect() as con:
            other = [k for (k,) in con.execute(sa.select(suppressions.c.key_id).distinct()) if k != hasher.key_id]
        if other:
            raise SuppressionError(_other_key_message(len(other)))
        wanted = {hasher(c): c for c in customer_ids}
        now = datetime.now(UTC)
        with self.engine.begin() as con:
            have = {h for (h,) in con.execute(sa.select(suppressions.c.id_hash)
                                                .where(suppressions.c.id_hash.in_(list(wanted))))}
            new = [{"id_hash": h, "key_id": hasher.key_id, "suppressed_at": now} for h in wanted if h not in have]
            if new:
                con.execute(upsert(self.engine, suppressions).on_conflict_do_nothing(), new)
        self.refresh()
        return len(new), len(wanted) - len(new)


def _hasher_for(home: Path, key_ids: set[str], n: int) -> IdHasher | None:
    if not n:
        return None
    key = load_key(home)
    if key is None:
        raise SuppressionError(f"the suppression list has {n:,} entries but no key: set {KEY_ENV} to the key "
                               f"`engage forget` used (or keep {KEY_FILE} in ENGAGE_HOME)")
    hasher = IdHasher(key)
    if key_ids - {hasher.key_id}:
        raise SuppressionError(_other_key_message(len(key_ids - {hasher.key_id})))
    return hasher


def _other_key_message(n_keys: int) -> str:
    return (f"the suppression list holds entries made with {n_keys} other key(s): set {KEY_ENV} (or "
            f"ENGAGE_HOME/{KEY_FILE}) to the key `engage forget` used, the same on every machine")


def _create_table(engine: Engine) -> None:
    try:
        metadata.create_all(engine)
    except (sa.exc.IntegrityError, sa.exc.ProgrammingError):  # PostgreSQL: another process created it first
        metadata.create_all(engine)


def open_list(home: Path, url: str | None = None) -> SuppressionList:
    """The list of ``home``'s serving database (``url`` or :func:`serving_db_url`), loaded.

    Raises:
        SuppressionError: it cannot be read (database unreachable, no or another key).
    """
    url = url or serving_db_url(home)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and not Path(parsed.database).exists():
        engine = create_serving_engine("sqlite://", create=False)  # nothing forgotten yet; make no file
    else:
        engine = create_serving_engine(url, create=False)
    try:
        listed = SuppressionList(engine, home)
        if not listed.refresh():
            raise SuppressionError(f"cannot read the suppression list ({url.split('@')[-1]}): {listed.error}")
        return listed
    finally:
        engine.dispose()  # the loaded list needs no connection; add() would open a new one


def drop_suppressed_rows(home: Path, path: Path) -> int:
    """Rewrite the Parquet/CSV file ``path`` without the rows of suppressed customers; returns rows removed.

    Used where a file with customer rows is made or read for scoring (batch scoring's snapshot, the ground
    truth copied by ingest), so a customer forgotten meanwhile never comes back through it.
    """
    from features.forget_files import file_customer_ids, rewrite_without

    listed = open_list(home)
    if not len(listed):
        return 0
    gone = listed.matching(file_customer_ids(path))
    return rewrite_without(path, set(gone)) if gone else 0
