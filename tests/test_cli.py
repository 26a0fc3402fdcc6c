"""The `engage` command: help everywhere, a full features run, and clear errors for bad input."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from engage.cli import app
from tests.factories import write_contract

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.mark.parametrize(
    "command",
    [[], ["simulate"], ["ingest"], ["features"], ["features", "build"], ["features", "apply"],
     ["features", "materialize"], ["features", "show"], ["train"], ["models"], ["models", "list"],
     ["models", "compare"], ["models", "promote"], ["rejects"], ["serve"], ["feedback"], ["feedback", "import"]],
)
def test_every_command_has_help(command):
    result = run(*command, "--help")
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_features_pipeline_end_to_end(tmp_path):
    home = str(tmp_path / "home")
    src = write_contract(tmp_path / "src")
    assert run("ingest", str(src), "--home", home).exit_code == 0
    built = run("features", "build", "--home", home, "--as-of", "2025-06-01T00:00:00Z", "--as-of", "2025-06-20")
    assert built.exit_code == 0 and built.output.count("snapshot 2025-06") == 2
    assert run("features", "apply", "--home", home).exit_code == 0
    assert run("features", "materialize", "--home", home).exit_code == 0
    shown = run("features", "show", "C1", "--home", home)
    assert shown.exit_code == 0
    assert "orders_lifetime" in shown.output and "C1" in shown.output


def test_ingest_prints_per_table_summary_and_reloads_nothing(tmp_path):
    home = str(tmp_path / "home")
    src = str(write_contract(tmp_path / "src"))
    first = run("ingest", src, "--home", home)
    assert first.exit_code == 0 and "events" in first.output and "customers" in first.output
    second = run("ingest", src, "--home", home)
    assert second.exit_code == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ingest", "/no/such/folder"], ""),
        (["features", "build", "--as-of", "next tuesday"], "not a timestamp"),
        (["features", "build"], "engage ingest"),
        (["features", "show", "C1", "--service", "fraud"], ""),
        (["train", "fraud"], "unknown model 'fraud'"),
        (["train", "churn"], "engage ingest"),
        (["models", "promote", "fraud", "1"], "unknown model"),
        (["models", "compare", "fraud"], "unknown model"),
        (["simulate", "--out", "x", "--customers", "0"], ""),
        (["simulate", "--out", "x", "--format", "xlsx"], ""),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'ml.db'}")
    result = runner.invoke(app, args)
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert message in result.output


def test_rejects_command_shows_reason_and_original(tmp_path):
    from tests.factories import EVENTS

    home = str(tmp_path / "home")
    bad = EVENTS.copy()
    bad.loc[0, "event_type"] = "buy"
    assert run("ingest", str(write_contract(tmp_path / "src", events=bad)), "--home", home).exit_code == 0
    shown = run("rejects", "--home", home, "--table", "events")
    assert shown.exit_code == 0
    assert "events 1" in shown.output and "'buy'" in shown.output and "e1" in shown.output
    assert "no rejected rows" in run("rejects", "--home", home, "--table", "offers").output


def test_failed_ingest_reports_without_traceback(tmp_path):
    src = write_contract(tmp_path / "src")
    (src / "events.csv").write_text("customer_id,event_type\nC1,purchase\n")  # event_at missing
    result = runner.invoke(app, ["ingest", str(src), "--home", str(tmp_path / "home")])
    assert result.exit_code == 2
    assert "event_at" in result.output and "Traceback" not in result.output


def test_serve_generates_a_key():
    result = run("serve", "--generate-key")
    assert result.exit_code == 0
    assert len(result.output.strip()) >= 40


@pytest.mark.parametrize("keys, message", [("", "no API key"), ("short", "at least 16 characters")])
def test_serve_refuses_to_start_without_a_usable_key(monkeypatch, keys, message):
    monkeypatch.setenv("ENGAGE_API_KEYS", keys)
    result = run("serve", "--port", "8999")
    assert result.exit_code == 2
    assert message in result.output


@pytest.mark.parametrize("args", [["--port", "0"], ["--port", "70000"], ["--workers", "0"], ["--log-level", "loud"]])
def test_serve_rejects_bad_flags(monkeypatch, args):
    monkeypatch.setenv("ENGAGE_API_KEYS", "a-long-enough-test-key-123")
    result = run("serve", *args)
    assert result.exit_code == 2
