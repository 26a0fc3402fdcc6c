"""The monitor's results and its rules, as plain data and pure functions (``monitor.py`` gathers the inputs).

A :class:`ModelDrift` per champion (PSI and missing shares per feature, PSI and means per score), the daily churn
score series (:func:`churn_rate_series`) and the calibration summary make a :class:`MonitorResult`;
:func:`alerts` applies the thresholds of the config's ``monitor`` section to it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime

import numpy as np
import pandas as pd

from training import drift


@dataclass(frozen=True)
class Champion:
    name: str
    version: str
    run_id: str
    trained_as_of: datetime
    features: list[str]
    model: object
    params: dict[str, str]


@dataclass
class Alert:
    model: str
    check: str  # feature_psi, score_psi, missing_share, churn_rate, calibration
    subject: str  # the feature or score
    value: float
    threshold: float
    level: str  # alert or warning
    message: str


@dataclass
class ModelDrift:
    name: str
    version: str
    run_id: str
    trained_as_of: str
    reference: str  # where the reference profile came from
    reference_rows: int
    features: list[dict]  # feature, psi, missing_reference, missing_current, ignored
    scores: list[dict]  # score, psi, reference_mean, current_mean, edges, reference_shares, current_shares

    @property
    def max_feature_psi(self) -> float:
        values = [f["psi"] for f in self.features if not f["ignored"] and np.isfinite(f["psi"])]
        return max(values, default=0.0)


@dataclass
class MonitorResult:
    as_of: datetime
    customers: int
    models: list[ModelDrift]
    churn_rate: dict | None = None
    calibration: dict | None = None
    alerts: list[Alert] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def fired(self) -> list[Alert]:
        return [a for a in self.alerts if a.level == "alert"]

    def to_json(self) -> dict:
        """Plain JSON types; a value that is not a finite number (a PSI over no rows) is null."""
        return _finite({
            "as_of": self.as_of.isoformat(), "customers": self.customers, "alerts": [asdict(a) for a in self.alerts],
            "alert_count": len(self.fired), "models": [asdict(m) | {"max_feature_psi": m.max_feature_psi}
                                                       for m in self.models],
            "churn_rate": self.churn_rate, "calibration": self.calibration, "notes": self.notes,
        })


def _finite(value):
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, bool | str | int) or value is None:
        return value
    if isinstance(value, np.integer | np.bool_):
        return value.item()
    if isinstance(value, float | np.floating):
        return float(value) if np.isfinite(value) else None
    return str(value)


# -- checks -------------------------------------------------------------------------------------------------


def compare_model(champ: Champion, ref: dict, source: str, current: pd.DataFrame, mcfg) -> ModelDrift:
    ignored = set(mcfg.ignore_features)
    rows = []
    for feature, col in ref["features"].items():
        values = current[feature] if feature in current else pd.Series(np.nan, index=current.index)
        c = drift.compare(col, values)
        rows.append({"feature": feature, "psi": c["psi"], "missing_reference": c["missing_reference"],
                     "missing_current": c["missing_current"], "ignored": feature in ignored})
    scores = []
    for score, values in drift.model_scores(champ.name, champ.model, current).items():
        col = ref["scores"].get(score)
        if col is None:
            continue
        c = drift.compare(col, pd.Series(values))
        scores.append({"score": score, "psi": c["psi"], "reference_mean": col.get("mean"),
                       "current_mean": float(np.nanmean(values)) if len(values) else None,
                       "edges": col["edges"], "reference_shares": col["shares"], "current_shares": c["current_shares"]})
    return ModelDrift(champ.name, champ.version, champ.run_id, champ.trained_as_of.isoformat(), source,
                      int(ref.get("rows", 0)), sorted(rows, key=lambda r: -np.nan_to_num(r["psi"])), scores)


def churn_rate_series(means: list[tuple[datetime, float]], reference: float, points: float, consecutive: int) -> dict:
    """Daily mean churn score against the reference; ``fired`` when the last ``consecutive`` days are all more
    than ``points`` percentage points away from it (in the same direction)."""
    diffs = [100.0 * (m - reference) for _, m in means]
    run = 0
    for d in reversed(diffs):
        if abs(d) > points and (run == 0 or np.sign(d) == np.sign(diffs[-1])):
            run += 1
        else:
            break
    return {"days": [t.isoformat() for t, _ in means], "means": [m for _, m in means], "reference": reference,
            "points": diffs, "threshold_points": points, "consecutive_days": consecutive, "days_over": run,
            "fired": run >= consecutive}


def alerts(result: MonitorResult, mcfg) -> list[Alert]:
    out = []

    def level(v: float) -> str | None:
        return "alert" if v > mcfg.psi_alert else ("warning" if v > mcfg.psi_warn else None)

    for m in result.models:
        for f in m.features:
            if f["ignored"]:
                continue
            lv = level(f["psi"]) if np.isfinite(f["psi"]) else None
            if lv:
                out.append(Alert(m.name, "feature_psi", f["feature"], f["psi"],
                                 mcfg.psi_alert if lv == "alert" else mcfg.psi_warn, lv,
                                 f"{f['feature']}: PSI {f['psi']:.3f} against the training data"))
            jump = f["missing_current"] - f["missing_reference"]
            if abs(jump) > mcfg.missing_jump:
                out.append(Alert(m.name, "missing_share", f["feature"], jump, mcfg.missing_jump, "alert",
                                 f"{f['feature']}: missing in {f['missing_current']:.1%} of customers "
                                 f"(training data: {f['missing_reference']:.1%})"))
        for s in m.scores:
            lv = level(s["psi"]) if np.isfinite(s["psi"]) else None
            if lv:
                out.append(Alert(m.name, "score_psi", s["score"], s["psi"],
                                 mcfg.psi_alert if lv == "alert" else mcfg.psi_warn, lv,
                                 f"{s['score']}: PSI {s['psi']:.3f} (mean {s['current_mean']:.3f}, training data "
                                 f"{s['reference_mean']:.3f})"))
    cr = result.churn_rate
    if cr and cr["fired"]:
        last = cr["points"][-1]
        out.append(Alert("churn", "churn_rate", "mean churn score", last, mcfg.churn_rate_jump_points, "alert",
                         f"mean churn score {cr['means'][-1]:.1%} is {last:+.1f} points from the training data's "
                         f"{cr['reference']:.1%} on {cr['days_over']} consecutive days"))
    cal = result.calibration
    if cal and cal["gap"] > mcfg.calibration_gap:
        out.append(Alert("churn", "calibration", f"predictions at {cal['at'][:10]}", cal["gap"], mcfg.calibration_gap,
                         "alert", f"churn predicted at {cal['at'][:10]}: mean {cal['predicted_mean']:.1%}, observed "
                                  f"{cal['observed_rate']:.1%} over the {cal['horizon_days']} days since"))
    return out
