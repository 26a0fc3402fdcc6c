"""Shared fixtures: a temporary ENGAGE_HOME per test, and one small simulated world per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
