"""`engage monitor`: is each champion still looking at the population it was trained on?

For the as-of time (default: just after the last loaded event) and every model holding the ``champion`` alias:

1. **Reference**: the profile of the champion's training data logged with its run (``drift.REFERENCE_ARTIFACT``);
   a champion trained before profiles were logged gets one rebuilt from its training snapshot times (logged).
2. **Current**: the feature snapshot at the as-of time (built when missing, as `engage score` does), scored by the
   champions (``drift.model_scores``).
3. **Checks** (thresholds in the config's ``monitor`` section): PSI per feature and per score, each feature's
   missing share, the daily mean churn score of the last ``churn_rate_days`` days against the reference (an alert
   only when it is off by more than ``churn_rate_jump_points`` on ``consecutive_days`` consecutive days up to the
   as-of day), and the calibration of the churn predictions made one horizon before the as-of time, now that
   their outcome is known (per decile, and the Brier score).

Daily and calibration snapshots are computed in memory (``snapshots.snapshot_sql``), so a daily job does not add
files to Feast's offline source. The results and the rules are plain data and pure functions in
``monitor_checks.py``; ``monitor_report.py`` turns the :class:`MonitorResult` into the printed tables, the HTML and
JSON report and the MLflow run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
from sklearn.metrics import brier_score_loss

from engage.config import EngageConfig
from features.catalog import stored_features
from features.labels import churn_labels
from features.list_features import expand_frame
from features.snapshots import (
    ENTITY,
    SnapshotError,
    checked_as_of,
    data_range,
    profile_columns,
    snapshot_sql,
    to_utc,
)
from training import drift
from training.base import TrainingError
from training.evaluate import calibration_table
from training.monitor_checks import Champion, MonitorResult, alerts, churn_rate_series, compare_model

log = logging.getLogger(__name__)
EXIT_ALERT = 3  # `engage monitor` exits with this when any alert fires (0: quiet, 2: bad input or failure)
StepHook = Callable[[str, int, int], None]  # (what is being done, steps done, steps in all)


class MonitorError(ValueError):
    """Monitoring cannot run (no data, no champion, as-of outside the data ...): a one-line reason."""


# -- inputs ------------------------------------------------------------------------------------------------


def resolve_as_of(con, as_of: datetime | str | None) -> datetime:
    return checked_as_of(con, as_of, MonitorError)


def load_champions(client) -> dict[str, Champion]:
    """Every model holding the ``champion`` alias, with its training cutoff, features and run params."""
    import mlflow

    from serving.models import champion_versions

    try:
        wanted = champion_versions(client)
    except Exception as exc:  # registry unreachable or broken
        raise MonitorError(f"cannot read the model registry: {type(exc).__name__}: {exc}") from exc
    if not wanted:
        raise MonitorError("no champion model is registered: run `engage train all` (or `engage retrain`) first")
    out = {}
    for name, version in wanted.items():
        mv = client.get_model_version(name, version)
        run = client.get_run(mv.run_id) if mv.run_id else None
        tags = mv.tags or {}
        as_of = tags.get("trained_as_of") or (run.data.tags.get("as_of") if run else None)
        if not as_of:
            raise MonitorError(f"{name} version {version} does not say when it was trained (tag trained_as_of)")
        try:
            model = mlflow.pyfunc.load_model(f"models:/{name}/{version}").unwrap_python_model()
        except Exception as exc:  # artifacts gone, unpicklable, ...: a reason, not a traceback
            raise MonitorError(f"{name} version {version} could not be loaded: {exc}") from exc
        out[name] = Champion(name, str(version), mv.run_id or "", to_utc(as_of),
                             json.loads(tags.get("features", "[]")), model, dict(run.data.params) if run else {})
    return out


def reference_profile(champ: Champion, home: Path, con, cfg: EngageConfig) -> tuple[dict, str]:
    """The profile logged with the champion's run, else one rebuilt from its training snapshot times."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.artifacts.load_dict(f"runs:/{champ.run_id}/{drift.REFERENCE_ARTIFACT}"), "logged at training"
    except (MlflowException, OSError) as exc:
        log.warning("%s version %s has no logged reference profile (%s): rebuilding it from its training snapshot "
                    "times as of %s", champ.name, champ.version, type(exc).__name__, f"{champ.trained_as_of:%Y-%m-%d}")
    horizon = int(champ.params.get("horizon_days") or getattr(champ.model, "horizon_days", cfg.training.horizon_days))
    try:
        ref = drift.build_reference(champ.name, champ.model, champ.features, home, con, cfg, champ.trained_as_of,
                                    horizon)
    except (ValueError, SnapshotError, TrainingError, OSError) as exc:
        raise MonitorError(f"{champ.name} version {champ.version}: no reference profile logged and none can be "
                           f"rebuilt: {exc}") from exc
    return ref, "rebuilt from the training snapshot times"


def snapshot_frame(con, cfg: EngageConfig, t: datetime, columns: list[str]) -> pd.DataFrame:
    """``columns`` of the feature snapshot at ``t``, computed in memory (no file)."""
    con.execute("SET TimeZone = 'UTC'")
    sql = snapshot_sql(t, cfg.features, profile_columns(con))
    available = {row[0] for row in con.execute(f"DESCRIBE SELECT * FROM ({sql})").fetchall()}  # binds, no run
    wanted = dict.fromkeys([ENTITY, *stored_features(columns)])
    names = ", ".join('"' + c.replace('"', '""') + '"' for c in wanted if c in available)
    return expand_frame(con.execute(f"SELECT {names} FROM ({sql})").df())


# -- calibration -------------------------------------------------------------------------------------------


def calibration(champ: Champion, con, cfg: EngageConfig, as_of: datetime) -> dict | None:
    """Churn predictions made one horizon before ``as_of`` against what happened since (None: too early)."""
    horizon = int(getattr(champ.model, "horizon_days", cfg.training.horizon_days))
    first_signup, last_event = data_range(con)
    t = (min(as_of, last_event) - timedelta(days=horizon)).replace(hour=0, minute=0, second=0, microsecond=0)
    if t <= first_signup:
        return None
    on = champ.params.get("churn_on") or cfg.training.churn_on
    labels = churn_labels(con, [t], horizon, on, cutoff=as_of)
    feats = snapshot_frame(con, cfg, t, [*champ.features, *drift.SCORING_COLUMNS])
    df = labels.merge(feats, on=ENTITY)
    if df.empty:
        return None
    p = drift.model_scores("churn", champ.model, df)["churn_probability"]
    y = df["churned"].to_numpy().astype(float)
    pred, obs, count = calibration_table(y, p)
    return {"at": t.isoformat(), "horizon_days": horizon, "churn_on": on, "customers": len(df),
            "out_of_time": t >= champ.trained_as_of, "predicted_mean": float(p.mean()),
            "observed_rate": float(y.mean()),
            "gap": float(abs(p.mean() - y.mean())), "brier": float(brier_score_loss(y, p)),
            "deciles": [{"predicted": float(a), "observed": float(b), "customers": int(c)}
                        for a, b, c in zip(pred, obs, count, strict=True)]}


# -- the run -----------------------------------------------------------------------------------------------


def run_monitor(home: Path, cfg: EngageConfig, as_of: datetime | str | None = None,
                on_step: StepHook | None = None) -> MonitorResult:
    """Compare the current population and scores with each champion's training data (see the module docstring)."""
    from features.load import connect_warehouse, warehouse_path
    from serving.batch import BatchError, ensure_snapshot
    from serving.service import registry_client

    if not warehouse_path(home).exists():
        raise MonitorError(f"no data loaded in {home}: run `engage ingest DIR` first")
    mcfg = cfg.monitor
    con = connect_warehouse(home, read_only=True)
    try:
        as_of = resolve_as_of(con, as_of)
        champions = load_champions(registry_client())
        churn = champions.get("churn")
        daily = [as_of.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=k)
                 for k in reversed(range(mcfg.churn_rate_days))] if churn else []
        daily = [t for t in daily if t > data_range(con)[0]]
        total, done = 1 + len(champions) + len(daily) + (1 if churn else 0), 0

        def step(what: str) -> None:
            nonlocal done
            if on_step:
                on_step(what, done, total)
            done += 1

        step(f"feature snapshot at {as_of:%Y-%m-%d %H:%M}")
        try:
            path = ensure_snapshot(home, as_of)
        except BatchError as exc:
            raise MonitorError(str(exc)) from exc
        wanted = {ENTITY, *drift.SCORING_COLUMNS, *(f for c in champions.values() for f in c.features)}
        current = expand_frame(pq.read_table(path, columns=[c for c in pq.read_schema(path).names if c in wanted])
                               .to_pandas())
        result = MonitorResult(as_of, len(current), [])
        for champ in champions.values():
            step(f"{champ.name} v{champ.version}: reference and drift")
            ref, source = reference_profile(champ, home, con, cfg)
            if source != "logged at training":
                result.notes.append(f"{champ.name} version {champ.version}: no reference profile was logged at "
                                    "training; it was rebuilt from the training snapshot times")
            result.models.append(compare_model(champ, ref, source, current, mcfg))
        if churn:
            drift_of_churn = next(m for m in result.models if m.name == "churn")
            reference = next((s["reference_mean"] for s in drift_of_churn.scores
                              if s["score"] == "churn_probability"), None)
            means = []
            for t in daily:
                step(f"daily churn score {t:%Y-%m-%d}")
                frame = snapshot_frame(con, cfg, t, [*churn.features, *drift.SCORING_COLUMNS])
                means.append((t, float(drift.model_scores("churn", churn.model, frame)["churn_probability"].mean())))
            if reference is not None and means:
                result.churn_rate = churn_rate_series(means, reference, mcfg.churn_rate_jump_points,
                                                      mcfg.consecutive_days)
            step("churn calibration")
            result.calibration = calibration(churn, con, cfg, as_of)
            if result.calibration is None:
                result.notes.append("no churn predictions whose horizon has passed yet: calibration not measured")
            elif not result.calibration["out_of_time"]:
                result.notes.append(f"calibration is measured on predictions at {result.calibration['at'][:10]}, "
                                    "before the champion's training cutoff (no later ones have a known outcome yet)")
        missing = sorted({"churn", "next_best_offer", "send_time"} - set(champions))
        if missing:
            result.notes.append(f"no champion for {', '.join(missing)}: not monitored")
        if on_step:
            on_step("done", total, total)
    except SnapshotError as exc:
        raise MonitorError(str(exc)) from exc
    finally:
        con.close()
    result.alerts = alerts(result, mcfg)
    return result
