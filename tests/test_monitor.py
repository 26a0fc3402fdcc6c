"""`engage monitor` on the simulator: quiet when the same world is monitored later, alerts (exit 3) once everyone's
behaviour shifts; the reference profile logged at training (and rebuilt without it), the rules, the Prometheus
gauges, and bad input."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from engage.cli import app

runner = CliRunner()
N, DAYS, START, SEED = 1500, 640, "2024-01-01", 11
TRAIN_AS_OF = "2025-08-15T00:00:00Z"
SHIFT_AT, SHIFT = "2025-08-20", "engagement"  # sessions, purchases and conversions halve from this day on
# Past the first year of the simulated history, so year-long windows are full in the training data too. A 30-day
# horizon and 8 snapshots keep training small; the thresholds are the defaults, with 3 daily churn means (not 7).
CONFIG = """training:
  horizon_days: 30
  max_snapshots: 8
  num_boost_round: 100
monitor:
  churn_rate_days: 3
"""
ENGAGEMENT_FEATURES = {"sessions_30d", "active_days_30d", "sessions_30d_vs_365d", "sessions_decayed_30d",
                       "days_since_last_session", "page_views_30d", "sessions_trend"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two worlds from the same seed, one with a behaviour shift after the training cutoff, and a churn model
    trained on the quiet one up to that cutoff, registered as champion in a module MLflow store."""
    from engage.config import load_config
    from features.load import ingest
    from features.simulate import simulate
    from training import churn
    from training.context import open_context
    from training.registry import log_and_register

    root = tmp_path_factory.mktemp("monitor")
    homes = {}
    for name, shift in (("quiet", {}), ("shifted", {"shift_at": SHIFT_AT, "shift": SHIFT})):
        src, home = root / name / "src", root / name / "home"
        simulate(N, DAYS, SEED, src, start=START, progress=False, **shift)
        ingest(src, home)
        (home / "engage.yaml").write_text(CONFIG)
        homes[name] = home
    env = pytest.MonkeyPatch()
    env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlruns.sqlite'}")
    env.setenv("ENGAGE_MLFLOW_ARTIFACTS", str(root / "artifacts"))
    env.delenv("ENGAGE_CONFIG", raising=False)
    try:
        # Before any model is registered: monitoring has nothing to compare (asserted below).
        no_champion = runner.invoke(app, ["monitor", "--home", str(homes["quiet"])])
        no_champion.files = _monitor_files(homes["quiet"])
        cfg = load_config(homes["quiet"] / "engage.yaml")
        with open_context(homes["quiet"], cfg, as_of=TRAIN_AS_OF) as ctx:
            registration = log_and_register(churn.train(ctx), ctx)
        yield SimpleNamespace(root=root, cfg=cfg, registration=registration, no_champion=no_champion, **homes)
    finally:
        env.undo()


@pytest.fixture(scope="module")
def reports(world):
    """`engage monitor` once per world, at the default as-of (the end of the data, six weeks after training)."""
    out = {}
    for name in ("quiet", "shifted"):
        home = getattr(world, name)
        result = runner.invoke(app, ["monitor", "--home", str(home)])
        latest = home / "monitor" / "latest.json"
        out[name] = SimpleNamespace(result=result, report=json.loads(latest.read_text()) if latest.exists() else None)
    return out


def _fired(report: dict) -> list[dict]:
    return [a for a in report["alerts"] if a["level"] == "alert"]


# -- the acceptance points ------------------------------------------------------------------------------------


def test_same_world_monitored_later_is_quiet(world, reports):
    r = reports["quiet"]
    assert r.result.exit_code == 0, r.result.output
    assert "no drift alert" in r.result.output
    rep = r.report
    assert rep["status"] == "quiet" and rep["alert_count"] == 0 and not _fired(rep)
    assert pd.Timestamp(rep["as_of"]) > pd.Timestamp(TRAIN_AS_OF) + pd.Timedelta(days=40)
    (model,) = rep["models"]
    assert model["name"] == "churn" and model["version"] == world.registration.version
    assert model["reference"] == "logged at training"
    assert model["max_feature_psi"] < world.cfg.monitor.psi_alert
    assert all(s["psi"] < world.cfg.monitor.psi_alert for s in model["scores"])
    assert len(rep["churn_rate"]["days"]) == 3 and not rep["churn_rate"]["fired"]
    cal = rep["calibration"]  # predictions made after the training cutoff, outcome known now
    assert cal["out_of_time"] and cal["gap"] <= world.cfg.monitor.calibration_gap
    assert 2 <= len(cal["deciles"]) <= 10 and sum(d["customers"] for d in cal["deciles"]) == cal["customers"]


def test_shifted_world_alerts_and_exits_3(world, reports):
    r = reports["shifted"]
    assert r.result.exit_code == 3, r.result.output
    assert "drift alert" in r.result.output
    rep = r.report
    fired = _fired(rep)
    assert rep["status"] == "alert" and rep["alert_count"] == len(fired) >= 1
    assert {a["subject"] for a in fired if a["check"] == "feature_psi"} & ENGAGEMENT_FEATURES
    assert all(a["value"] > a["threshold"] for a in fired)
    # Less engagement means more churn risk: the champion's scores moved up against the quiet world's.
    mean = {name: reports[name].report["models"][0]["scores"][0]["current_mean"] for name in ("quiet", "shifted")}
    assert mean["shifted"] > mean["quiet"]
    for a in fired:  # each alert is in the printed table
        assert a["subject"] in r.result.output


def test_report_files_and_mlflow_run(world, reports):
    from training.registry import connect

    rep = reports["shifted"].report
    html_path = Path(rep["report"])
    assert html_path.parent == world.shifted / "monitor" and html_path.exists()
    text = html_path.read_text()
    assert text.count("data:image/png;base64,") == 4  # feature PSI, scores, daily churn, calibration
    assert "active_days_30d" in text
    assert json.loads(html_path.with_suffix(".json").read_text())["mlflow_run_id"] == rep["mlflow_run_id"]
    assert not list((world.shifted / "monitor").glob(".*tmp"))
    client = connect()
    run = client.get_run(rep["mlflow_run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "engage-monitor"
    assert run.data.metrics["alerts"] == rep["alert_count"] and run.data.tags["status"] == "alert"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {html_path.name, html_path.with_suffix(
        ".json").name, "churn_feature_psi.png", "churn_calibration.png"}


def test_reference_profile_is_the_training_snapshots(world):
    import mlflow

    from training.drift import REFERENCE_ARTIFACT
    from training.registry import connect

    connect()
    run_id = world.registration.run_id
    ref = mlflow.artifacts.load_dict(f"runs:/{run_id}/{REFERENCE_ARTIFACT}")
    table = mlflow.artifacts.load_dict(f"runs:/{run_id}/tables/snapshots.json")  # logged by churn.train
    roles = pd.DataFrame(table["data"], columns=table["columns"])
    train_times = roles.loc[roles["role"] == "train", "snapshot_at"].tolist()
    assert [pd.Timestamp(t) for t in ref["times"]] == [pd.Timestamp(t) for t in train_times]
    col = ref["features"]["days_since_last_purchase"]
    assert col["kind"] == "numeric" and sum(col["shares"]) == pytest.approx(1.0)
    assert len(col["shares"]) == len(col["edges"]) + 2  # bins, then the missing share
    assert 0 < col["missing"] < 1 and col["shares"][-1] == pytest.approx(col["missing"])
    assert ref["features"]["segment"]["kind"] == "categorical"
    assert "churn_probability" in ref["scores"] and 0 < ref["scores"]["churn_probability"]["mean"] < 1


def test_champion_without_logged_profile_gets_it_rebuilt(world, caplog):
    """The fallback for champions trained before profiles were logged: the same rows, so the same profile."""
    import mlflow
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from features.load import connect_warehouse
    from serving.service import registry_client
    from training.drift import REFERENCE_ARTIFACT
    from training.monitor import load_champions, reference_profile

    champ = load_champions(registry_client())["churn"]
    logged = mlflow.artifacts.load_dict(f"runs:/{champ.run_id}/{REFERENCE_ARTIFACT}")
    repo = get_artifact_repository(mlflow.get_run(champ.run_id).info.artifact_uri)
    saved = Path(mlflow.artifacts.download_artifacts(f"runs:/{champ.run_id}/{REFERENCE_ARTIFACT}",
                                                     dst_path=str(world.root / "saved")))
    repo.delete_artifacts("monitor")
    con = connect_warehouse(world.quiet, read_only=True)
    try:
        with caplog.at_level(logging.WARNING, logger="training.monitor"):
            rebuilt, source = reference_profile(champ, world.quiet, con, world.cfg)
    finally:
        con.close()
        repo.log_artifact(str(saved), "monitor")
    assert source == "rebuilt from the training snapshot times"
    assert "no logged reference profile" in caplog.text and "rebuilding" in caplog.text
    assert rebuilt["times"] == logged["times"] and rebuilt["features"] == logged["features"]
    assert rebuilt["scores"]["churn_probability"]["shares"] == pytest.approx(logged["scores"]["churn_probability"]
                                                                             ["shares"])


# -- the rules --------------------------------------------------------------------------------------------------


def test_churn_rate_alert_needs_consecutive_days_in_one_direction():
    from training.monitor_checks import churn_rate_series

    days = pd.date_range("2025-09-01", periods=5, tz="UTC").to_pydatetime().tolist()

    def fired(means):
        return churn_rate_series(list(zip(days, means, strict=True)), 0.50, 5.0, 3)["fired"]

    assert fired([0.50, 0.50, 0.56, 0.57, 0.58])  # three days over 5 points
    assert not fired([0.56, 0.57, 0.58, 0.50, 0.56])  # over on three days, but not the last three
    assert not fired([0.50, 0.50, 0.50, 0.56, 0.57])  # two days
    assert not fired([0.50, 0.50, 0.44, 0.56, 0.57])  # down then up: not one jump
    assert fired([0.50, 0.50, 0.44, 0.43, 0.40])  # a drop counts too
    assert not fired([0.54, 0.54, 0.54, 0.54, 0.54])  # 4 points: under the threshold


def test_psi_is_zero_for_the_same_distribution_and_sees_shifts_and_missing_values():
    from training.drift import column_profile, compare, psi

    rng = np.random.default_rng(0)
    ref = column_profile(pd.Series(rng.exponential(10, 20_000)))
    assert compare(ref, pd.Series(rng.exponential(10, 20_000)))["psi"] < 0.01
    assert compare(ref, pd.Series(rng.exponential(20, 20_000)))["psi"] > 0.2
    half_missing = pd.Series(np.where(rng.random(20_000) < 0.5, np.nan, rng.exponential(10, 20_000)))
    c = compare(ref, half_missing)
    assert c["psi"] > 0.2 and c["missing_current"] == pytest.approx(0.5, abs=0.02) and c["missing_reference"] == 0
    cats = column_profile(pd.Series(["a"] * 700 + ["b"] * 300))
    assert compare(cats, pd.Series(["a"] * 690 + ["b"] * 310))["psi"] < 0.01
    assert compare(cats, pd.Series(["c"] * 1000))["psi"] > 1  # a value never seen falls in "other"
    assert np.isnan(psi([0.5, 0.5], [0.0, 0.0]))


# -- Prometheus ---------------------------------------------------------------------------------------------------


def _samples(text: str, name: str) -> dict[tuple, float]:
    out = {}
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if m:
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m.group(1) or "")))
            out[labels] = float(m.group(2))
    return out


def test_service_exports_the_latest_monitor_results(reports, tmp_path):
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from serving.settings import ServingSettings

    rep = reports["shifted"].report
    home = tmp_path / "home"
    (home / "monitor").mkdir(parents=True)
    (home / "monitor" / "latest.json").write_text(json.dumps(rep))
    settings = ServingSettings(home=home, api_keys=["k" * 20], serving_db_url=f"sqlite:///{tmp_path / 's.db'}",
                               reload_interval_s=0)
    # This home has no feature store, so the service loads no model (and says why): the gauges come from the file.
    with TestClient(create_app(settings)) as client:
        text = client.get("/metrics").text
    alerts = _samples(text, "engage_drift_alerts")
    assert alerts[(("model", "churn"),)] == rep["alert_count"] > 0
    psi = _samples(text, "engage_drift_psi")
    model = rep["models"][0]
    for row in model["features"][:5]:
        assert psi[(("feature", row["feature"]), ("model", "churn"))] == pytest.approx(row["psi"])
    assert psi[(("feature", "churn_probability"), ("model", "churn"))] == pytest.approx(model["scores"][0]["psi"])
    assert _samples(text, "engage_drift_max_psi")[(("model", "churn"),)] == pytest.approx(model["max_feature_psi"])
    assert _samples(text, "engage_drift_monitor_timestamp_seconds")[()] == pytest.approx(
        pd.Timestamp(rep["run_at"]).timestamp())


# -- bad input ------------------------------------------------------------------------------------------------------


def _monitor_files(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "monitor").glob("*")) if (home / "monitor").exists() else []


def test_no_champion_registered_is_a_clear_error(world):
    result = world.no_champion  # run before the champion was trained, when nothing else had been written
    assert result.exit_code == 2
    assert "no champion model is registered" in result.output and "Traceback" not in result.output
    assert "engage train all" in result.output and result.files == []  # no report, not even a partial one


@pytest.mark.parametrize(("args", "message"), [
    (["--as-of", "2030-01-01"], "outside the data"),
    (["--as-of", "2019-06-01T00:00:00Z"], "outside the data"),
    (["--as-of", "last tuesday"], "is not a timestamp"),
    (["--out", "report.pdf"], "use an .html file"),
])
def test_bad_options_fail_clearly_and_write_nothing(world, reports, args, message):
    before = _monitor_files(world.quiet)
    result = runner.invoke(app, ["monitor", "--home", str(world.quiet), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert _monitor_files(world.quiet) == before


def test_no_data_and_bad_thresholds_fail_clearly(tmp_path):
    empty = runner.invoke(app, ["monitor", "--home", str(tmp_path / "empty")])
    assert empty.exit_code == 2 and "no data loaded" in empty.output
    home = tmp_path / "home"
    home.mkdir()
    (home / "engage.yaml").write_text("monitor:\n  psi_warn: 0.5\n  psi_alert: 0.2\n")
    bad = runner.invoke(app, ["monitor", "--home", str(home)])
    assert bad.exit_code == 2 and "psi_warn must not be above psi_alert" in bad.output
    (home / "engage.yaml").write_text("monitor:\n  psi_alrt: 0.3\n")
    typo = runner.invoke(app, ["monitor", "--home", str(home)])
    assert typo.exit_code == 2 and "psi_alrt" in typo.output


def test_a_failed_mlflow_log_leaves_no_report(reports, tmp_path, monkeypatch):
    """Files appear only after the MLflow run is logged: a store that cannot be written leaves nothing."""
    from training.base import TrainingError
    from training.monitor_checks import ModelDrift, MonitorResult
    from training.monitor_report import write_report

    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker / 'mlruns.sqlite'}")
    result = MonitorResult(pd.Timestamp("2025-10-01", tz="UTC").to_pydatetime(), 10, [ModelDrift(
        "churn", "1", "run", "2025-08-15", "logged at training", 10,
        [{"feature": "orders_30d", "psi": 0.3, "missing_reference": 0.0, "missing_current": 0.0, "ignored": False}],
        [])])
    with pytest.raises(TrainingError, match="not writable"):
        write_report(result, tmp_path / "home", 0.1, 0.2)
    assert _monitor_files(tmp_path / "home") == []


# -- the simulator's shift --------------------------------------------------------------------------------------------


def test_shift_halves_sessions_from_its_day_on(world):
    def daily_sessions(name: str) -> pd.Series:
        ev = pd.read_parquet(world.root / name / "src" / "events.parquet", columns=["event_type", "event_at"])
        return ev[ev["event_type"] == "session"].set_index("event_at").resample("D").size()

    quiet, shifted = daily_sessions("quiet"), daily_sessions("shifted")
    at = pd.Timestamp(SHIFT_AT, tz="UTC")
    before = slice(at - pd.Timedelta(days=60), at - pd.Timedelta(days=1))
    after = slice(at, at + pd.Timedelta(days=40))
    assert shifted[before].sum() / quiet[before].sum() == pytest.approx(1.0, abs=0.1)
    assert shifted[after].sum() / quiet[after].sum() == pytest.approx(0.5, abs=0.1)


def test_shift_options_are_checked(tmp_path):
    from features.simulate import simulate

    for kwargs, message in (({"shift_at": "2025-01-10"}, "needs both"),
                            ({"shift_at": "2025-01-10", "shift": "prices"}, "not one of purchases, engagement"),
                            ({"shift_at": "2026-01-01", "shift": "purchases"}, "outside the simulated window"),
                            ({"shift_at": "soon", "shift": "purchases"}, "not an ISO-8601 date")):
        with pytest.raises(ValueError, match=message):
            simulate(20, 30, 1, tmp_path / "x", progress=False, **kwargs)
    result = runner.invoke(app, ["simulate", "--out", str(tmp_path / "y"), "--customers", "20", "--days", "30",
                                 "--shift-at", "2025-01-10", "--shift", "prices"])
    assert result.exit_code == 2 and "not one of purchases, engagement" in result.output
    assert not (tmp_path / "y" / "events.parquet").exists()
