"""Shared fixtures: a temporary ENGAGE_HOME per test, and one small simulated world per session."""

from __future__ import annotations

import contextlib
import getpass
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis
import sqlalchemy as sa

from tests.helpers import LOCAL_HOST, PG_PORT, REDIS_PORT

_skipped: list[str] = []


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test touches the repo's data/ or a config from the developer's environment."""
    monkeypatch.setenv("ENGAGE_HOME", str(tmp_path / "engage_home"))
    monkeypatch.delenv("ENGAGE_CONFIG", raising=False)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under CI=true a skipped test is a failure: real services (PostgreSQL, Redis) must be there."""
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"} and _skipped:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter:
            reporter.write_line(f"CI=true: {len(_skipped)} test(s) were skipped, which fails CI:", red=True)
            for nodeid in _skipped:
                reporter.write_line(f"  {nodeid}", red=True)
        session.exitstatus = 1




def _pg_admin(database: str, **engine_args) -> tuple[sa.Engine, str]:
    """An engine on the local PostgreSQL ``database`` as user postgres or the current user; skips (which fails
    CI=true) when neither can connect."""
    for user in dict.fromkeys(("postgres", getpass.getuser())):
        engine = sa.create_engine(f"postgresql+psycopg://{user}@{LOCAL_HOST}:{PG_PORT}/{database}",
                                  connect_args={"connect_timeout": 3}, **engine_args)
        try:
            with engine.connect():
                return engine, user
        except sa.exc.OperationalError:
            engine.dispose()
    pytest.skip(f"PostgreSQL is not reachable at {LOCAL_HOST}:{PG_PORT} (database {database}, user postgres or "
                "current user)")


@contextlib.contextmanager
def _created(admin: sa.Engine, create: str, drop: str) -> Iterator[None]:
    """Run ``create`` on ``admin``, then ``drop`` when the block ends (however it ends), and dispose of it."""
    try:
        with admin.begin() as con:
            con.exec_driver_sql(create)
        yield
    finally:
        with admin.begin() as con:
            con.exec_driver_sql(drop)
        admin.dispose()


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A fresh schema in the local PostgreSQL database ``test`` (an SQLAlchemy URL), dropped afterwards."""
    admin, user = _pg_admin("test")
    schema = f"engage_test_{uuid.uuid4().hex[:12]}"
    with _created(admin, f'CREATE SCHEMA "{schema}"', f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'):
        yield f"postgresql+psycopg://{user}@{LOCAL_HOST}:{PG_PORT}/test?options=-csearch_path%3D{schema}"


@pytest.fixture(scope="module")
def pg_database() -> Iterator[SimpleNamespace]:
    """A fresh PostgreSQL database (``CREATE DATABASE``; ``url`` in the form ENGAGE_POSTGRES_URL takes), dropped
    after."""
    admin, user = _pg_admin("postgres", isolation_level="AUTOCOMMIT")  # CREATE DATABASE runs outside a transaction
    name = f"engage_test_{uuid.uuid4().hex[:12]}"
    with _created(admin, f'CREATE DATABASE "{name}"', f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'):
        yield SimpleNamespace(user=user, name=name, url=f"postgresql://{user}@{LOCAL_HOST}:{PG_PORT}/{name}")


@pytest.fixture(scope="module")
def redis_db():
    """A Redis database number on the shared server that no one else uses (claimed with the marker key
    ``claim``), flushed after."""
    claim = f"engage:test:claim:{uuid.uuid4().hex}"
    for db in range(15, 0, -1):
        client = redis.Redis(host=LOCAL_HOST, port=REDIS_PORT, db=db, socket_connect_timeout=2, socket_timeout=5)
        try:
            if client.dbsize() == 0 and client.set(claim, "1", nx=True, ex=3 * 3600) and client.dbsize() == 1:
                break
        except redis.exceptions.RedisError as exc:
            pytest.skip(f"Redis is not reachable at {LOCAL_HOST}:{REDIS_PORT}: {exc}")
        client.close()
    else:
        pytest.skip(f"no free Redis database number on {LOCAL_HOST}:{REDIS_PORT} (databases 1-15 are all in use)")
    try:
        yield SimpleNamespace(db=db, url=f"redis://{LOCAL_HOST}:{REDIS_PORT}/{db}", client=client, claim=claim.encode())
    finally:
        client.flushdb()
        client.close()


@pytest.fixture(scope="session")
def sim_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small simulated world (2,000 customers, 365 days), loaded into its own ENGAGE_HOME.

    Shared by the training tests: they read it and add snapshot files, never change loaded data.
    """
    from features.load import ingest
    from features.simulate import simulate
    from features.truth import store_ground_truth

    root = tmp_path_factory.mktemp("sim")
    src, home = root / "src", root / "home"
    simulate(2000, 365, 11, src, progress=False)
    ingest(src, home)
    store_ground_truth(src, home)
    return home


@pytest.fixture
def mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point MLflow at a throwaway SQLite store, so tests never touch mlruns/."""
    uri = f"sqlite:///{tmp_path / 'mlruns.sqlite'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("ENGAGE_MLFLOW_ARTIFACTS", str(tmp_path / "artifacts"))
    return uri


@pytest.fixture(scope="session")
def trained_churn(sim_home: Path):
    """The churn pipeline trained once on ``sim_home``: (context, TrainResult)."""
    from engage.config import load_config
    from training import churn
    from training.context import open_context

    with open_context(sim_home, load_config()) as ctx:
        yield ctx, churn.train(ctx)


API_KEY = "test-api-key-0123456789abcdef"


@pytest.fixture(scope="session")
def served(sim_home: Path, trained_churn, tmp_path_factory: pytest.TempPathFactory):
    """``sim_home`` with Feast applied and materialized and the three models registered as champions in a
    session MLflow store. Tests that change the registry use ``serving_env`` (a private copy of it)."""
    from types import SimpleNamespace

    from engage.config import load_config
    from tests.helpers import apply_and_materialize
    from training import next_best_offer, send_time
    from training.context import open_context
    from training.registry import log_and_register

    root = tmp_path_factory.mktemp("served")
    db, artifacts = root / "mlruns.sqlite", root / "artifacts"
    ctx, churn_result = trained_churn
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
        mp.setenv("ENGAGE_MLFLOW_ARTIFACTS", str(artifacts))
        log_and_register(churn_result, ctx)
        with open_context(sim_home, load_config()) as c:
            for module in (next_best_offer, send_time):
                log_and_register(module.train(c), c)
        apply_and_materialize(sim_home)
    return SimpleNamespace(home=sim_home, registry_db=db, artifacts=artifacts)


@pytest.fixture
def serving_env(served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Env for a scoring service over ``served``: a private copy of the registry, its own serving database."""
    import shutil
    from types import SimpleNamespace

    db = tmp_path / "mlruns.sqlite"
    shutil.copy(served.registry_db, db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setenv("ENGAGE_MLFLOW_ARTIFACTS", str(served.artifacts))
    monkeypatch.setenv("ENGAGE_API_KEYS", API_KEY)
    serving_db = f"sqlite:///{tmp_path / 'serving.db'}"
    monkeypatch.setenv("ENGAGE_SERVING_DB_URL", serving_db)
    return SimpleNamespace(home=served.home, registry_db=db, serving_db=serving_db, api_key=API_KEY)
