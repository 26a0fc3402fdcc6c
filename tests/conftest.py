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
