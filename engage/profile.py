"""Deployment profiles: ``embedded`` (default: SQLite, DuckDB and files under ENGAGE_HOME, one machine) and
``production`` (Redis as Feast's online store, PostgreSQL for Feast's SQL registry, MLflow and the serving
database; several scoring processes share them).

One switch: ``ENGAGE_PROFILE=production`` (or ``engage --profile production ...``) with

- ``ENGAGE_REDIS_URL``: ``redis://[:password@]host:port/db`` (the db number keeps deployments apart);
- ``ENGAGE_POSTGRES_URL``: ``postgresql://user[:password]@host:port/database``: Feast registry and the
  serving database (decision log, feedback);
- ``MLFLOW_TRACKING_URI``: MLflow's backend store; defaults to ``ENGAGE_POSTGRES_URL`` under this profile.

Nothing else changes: every command reads the same settings from the environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

EMBEDDED, PRODUCTION = "embedded", "production"
PROFILES = (EMBEDDED, PRODUCTION)
# A Redis that does not answer must not hold a request: reads give up after this and answer degraded.
REDIS_SOCKET_TIMEOUT_S = 0.5


class ProfileError(ValueError):
    """The profile or one of its settings is missing or invalid."""


def profile_name() -> str:
    name = (os.environ.get("ENGAGE_PROFILE") or EMBEDDED).strip().lower()
    if name not in PROFILES:
        raise ProfileError(f"ENGAGE_PROFILE={name!r}: use {' or '.join(PROFILES)}")
    return name


def is_production() -> bool:
    return profile_name() == PRODUCTION


@dataclass(frozen=True)
class ProductionSettings:
    redis_url: str
    postgres_url: str  # SQLAlchemy URL with the psycopg (3) driver

    @property
    def redis_connection_string(self) -> str:
        """Feast's Redis ``connection_string``: ``host:port,db=N,password=..,socket_timeout=..``."""
        return feast_redis_connection_string(self.redis_url)


def production_settings() -> ProductionSettings:
    """The production settings from the environment; a clear error names what is missing."""
    redis_url = os.environ.get("ENGAGE_REDIS_URL", "").strip()
    pg_url = os.environ.get("ENGAGE_POSTGRES_URL", "").strip()
    missing = [n for n, v in (("ENGAGE_REDIS_URL", redis_url), ("ENGAGE_POSTGRES_URL", pg_url)) if not v]
    if missing:
        raise ProfileError(f"ENGAGE_PROFILE=production needs {' and '.join(missing)} "
                           "(e.g. redis://127.0.0.1:6379/0 and postgresql://engage@127.0.0.1:5432/engage)")
    return ProductionSettings(redis_url=redis_url, postgres_url=psycopg_url(pg_url))


def psycopg_url(url: str) -> str:
    """``postgresql://`` / ``postgres://`` as ``postgresql+psycopg://`` (psycopg 3 is what Engage ships)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ProfileError(f"not a database URL: {url!r}")
    if scheme in ("postgresql", "postgres"):
        return f"postgresql+psycopg://{rest}"
    if not scheme.startswith("postgresql+"):
        raise ProfileError(f"ENGAGE_POSTGRES_URL must be a postgresql:// URL, not {scheme}://")
    return url


def feast_redis_connection_string(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme not in ("redis", "rediss"):
        raise ProfileError(f"ENGAGE_REDIS_URL must be a redis:// or rediss:// URL, not {url!r}")
    parts = [f"{parsed.hostname or '127.0.0.1'}:{parsed.port or 6379}"]
    db = (parsed.path or "/").strip("/") or "0"
    if not db.isdigit():
        raise ProfileError(f"ENGAGE_REDIS_URL: the database must be a number, not {db!r}")
    parts.append(f"db={int(db)}")
    if parsed.username:
        parts.append(f"username={unquote(parsed.username)}")
    if parsed.password:
        parts.append(f"password={unquote(parsed.password)}")
    if parsed.scheme == "rediss":
        parts.append("ssl=true")
    parts += [f"socket_timeout={REDIS_SOCKET_TIMEOUT_S}", f"socket_connect_timeout={REDIS_SOCKET_TIMEOUT_S}"]
    return ",".join(parts)


def default_tracking_uri() -> str | None:
    """MLflow's store under the production profile when ``MLFLOW_TRACKING_URI`` is not set."""
    return production_settings().postgres_url if is_production() else None


def default_serving_db_url() -> str | None:
    """The serving database under the production profile when ``ENGAGE_SERVING_DB_URL`` is not set."""
    return production_settings().postgres_url if is_production() else None
