"""`engage train all` through the CLI: without exposures it trains churn and says why the others skip."""

from __future__ import annotations

import shutil

from typer.testing import CliRunner

from engage.cli import app
from features.load import ingest

runner = CliRunner()


def test_train_all_without_exposures_trains_churn_only(sim_home, tmp_path, mlflow_uri):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("customers.parquet", "events.parquet", "offers.parquet"):
        shutil.copy(sim_home.parent / "src" / name, src / name)
    home = tmp_path / "home"
    ingest(src, home)

    result = runner.invoke(app, ["train", "all", "--home", str(home)])

    assert result.exit_code == 0, result.output
    assert "churn version 1 -> champion" in result.output
    assert "skipped nbo" in result.output and "skipped send-time" in result.output
    assert "exposures" in result.output  # says what is missing
    compare = runner.invoke(app, ["models", "compare"])
    assert compare.exit_code == 0 and "churn" in compare.output and "champion" in compare.output


def test_train_nbo_without_exposures_fails_clearly(sim_home, tmp_path, mlflow_uri):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("customers.parquet", "events.parquet"):
        shutil.copy(sim_home.parent / "src" / name, src / name)
    home = tmp_path / "home"
    ingest(src, home)
    result = runner.invoke(app, ["train", "nbo", "--home", str(home)])
    assert result.exit_code == 2
    assert "exposures" in result.output and "Traceback" not in result.output
