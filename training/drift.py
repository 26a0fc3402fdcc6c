"""Drift profiles: a compact picture of the data a model was trained on, and the population stability index.

A profile describes each column in a few numbers: a numeric column by its reference deciles (bin edges) and
the share of rows in each bin, a text or boolean column by the shares of its most common values, and both by
their share of missing values. A model's reference profile covers its feature-service columns over the rows it
was trained on and its own scores on those rows (:func:`model_scores`); ``registry.py`` logs it with every run
(:data:`REFERENCE_ARTIFACT`) and ``monitor.py`` compares the current population with it.

The rows are the feature snapshots at the run's training times (:func:`reference_times`): the churn training
snapshots, or for the offer and send-time models the latest weekly snapshots over their training sends. A snapshot file
at T is exactly what Feast's point-in-time join returns for every customer at T (see ``serving/batch.py``), so the
files are read directly, a deterministic sample of at most :data:`REFERENCE_ROWS` rows in all.

PSI = sum over bins of (current - reference) x ln(current / reference), shares floored at 1e-4. Missing values
are a bin of their own (as in credit scoring): a rare feature (days since the last complaint, missing for most
customers) then drifts as much as the whole population's distribution does, not as much as its few values do.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from features.catalog import HOUR_PROFILE_CHANNELS, model_columns, stored_features
from features.labels import exposure_labels
from features.list_features import expand_frame
from features.snapshots import (
    ENTITY,
    TIMESTAMP_FIELD,
    build_snapshots,
    data_range,
    snapshot_file,
    snapshot_times,
    to_utc,
)
from training import ope

log = logging.getLogger(__name__)
REFERENCE_ARTIFACT = "monitor/reference_profile.json"
PROFILE_VERSION = 1
BINS = 10
MAX_CATEGORIES = 20
REFERENCE_ROWS = 50_000
_FLOOR = 1e-4
# Columns the models' scoring reads besides their own features (expected order value, buy-till-you-die inputs).
SCORING_COLUMNS = ("orders_365d", "revenue_365d", "orders_lifetime", "tenure_days", "days_since_last_purchase")


# -- profiles and PSI --------------------------------------------------------------------------------------


def _numeric(values: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)


def column_profile(values: pd.Series) -> dict:
    """Bin edges (or categories) and the share of rows in each bin, the last bin being the missing values."""
    if _numeric(values):
        x = pd.to_numeric(values, errors="coerce").to_numpy(float)
        ok = x[np.isfinite(x)]
        edges = np.unique(np.quantile(ok, np.linspace(0, 1, BINS + 1)[1:-1])) if len(ok) else np.array([])
        return {"kind": "numeric", "edges": edges.tolist(), "shares": numeric_shares(x, edges).tolist(),
                "missing": missing_share(values), "mean": float(ok.mean()) if len(ok) else None, "rows": len(x)}
    top = values.dropna().astype(str).value_counts().head(MAX_CATEGORIES)
    return {"kind": "categorical", "categories": top.index.tolist(),
            "shares": categorical_shares(values, top.index.tolist()).tolist(), "missing": missing_share(values),
            "rows": len(values)}


def numeric_shares(x: np.ndarray, edges: np.ndarray | Sequence[float]) -> np.ndarray:
    """Shares of ``x`` in the bins (-inf, e1], (e1, e2], ..., (ek, inf) (point masses keep their own bin), then
    the missing share (NaN, inf)."""
    edges = np.asarray(edges, dtype=float)
    if not len(x):
        return np.zeros(len(edges) + 2)
    ok = np.isfinite(x)
    counts = np.bincount(np.searchsorted(edges, x[ok], side="left"), minlength=len(edges) + 1)
    return np.r_[counts, (~ok).sum()] / len(x)


def categorical_shares(values: pd.Series, categories: Sequence[str]) -> np.ndarray:
    """Shares of each of ``categories``, then of every other value, then of the missing values."""
    if not len(values):
        return np.zeros(len(categories) + 2)
    counts = values.dropna().astype(str).value_counts()
    known = np.array([counts.get(c, 0) for c in categories], dtype=float)
    return np.r_[known, counts.sum() - known.sum(), values.isna().sum()] / len(values)


def current_shares(ref: dict, values: pd.Series) -> np.ndarray:
    """Shares of ``values`` in the bins (or categories) of the reference column ``ref``."""
    if ref["kind"] == "numeric":
        return numeric_shares(pd.to_numeric(values, errors="coerce").to_numpy(float), ref["edges"])
    return categorical_shares(values, ref["categories"])


def psi(reference: Sequence[float], current: Sequence[float]) -> float:
    """Population stability index of two share vectors over the same bins (NaN if either is empty)."""
    r, c = np.asarray(reference, dtype=float), np.asarray(current, dtype=float)
    if r.sum() <= 0 or c.sum() <= 0:
        return float("nan")
    r, c = np.maximum(r, _FLOOR), np.maximum(c, _FLOOR)
    return float(np.sum((c - r) * np.log(c / r)))


def missing_share(values: pd.Series) -> float:
    if not len(values):
        return 0.0
    if _numeric(values):
        return float(1 - np.isfinite(pd.to_numeric(values, errors="coerce").to_numpy(float)).mean())
    return float(values.isna().mean())


def compare(ref: dict, values: pd.Series) -> dict:
    """PSI and missing shares of ``values`` against one reference column."""
    cur = current_shares(ref, values)
    return {"psi": psi(ref["shares"], cur), "missing_reference": float(ref["missing"]),
            "missing_current": missing_share(values), "current_shares": cur.tolist()}


# -- what each model says, as distributions --------------------------------------------------------------


def model_scores(name: str, model, df: pd.DataFrame) -> dict[str, np.ndarray]:
    """The scores monitored per model: churn probability; the best offer's uplift (P(convert | offer) - P(convert |
    no offer) of the offer with the highest incremental profit); per channel, the open rate at the best hour."""
    df = df.reset_index(drop=True)
    if name == "churn":
        return {"churn_probability": model.score_matrix(model.prepare(df))}
    if name == "next_best_offer":
        p = model.score_matrix(model.prepare(df))
        if p.shape[1] < 2:
            return {}
        profit = ope.incremental_profit(p, model.expected_revenue(df), model.costs, model.margin)
        best = 1 + profit[:, 1:].argmax(axis=1)
        return {"nbo_best_offer_uplift": p[np.arange(len(df)), best] - p[:, 0]}
    if name == "send_time":
        curves = model.open_curves(model.prepare(df))
        return {f"send_time_best_open_rate_{ch}": np.where(model.allowed_hours(ch), cur, -np.inf).max(axis=1)
                for ch, cur in curves.items()}
    raise ValueError(f"unknown model {name!r}")


# -- the reference rows ------------------------------------------------------------------------------------


def reference_times(con, cfg, model_name: str, as_of: datetime, horizon_days: int) -> list[datetime]:
    """The snapshot times a model trained as of ``as_of`` learned from, recomputed with training's own rules.

    Churn: the training snapshots of ``churn.train`` (weekly, a horizon before the holdout). Offer and send-time
    models: the weekly snapshots before the holdout's first send (``datasets.split_by_time``), the latest
    ``max_snapshots`` of them, as for churn: they learn from every send since the campaign log began, and a
    mixture of years of snapshots (the first ones with year-long windows still filling) is no population to
    compare today's with.
    """
    from training.datasets import churn_times, split_by_time

    tcfg = cfg.training
    if model_name == "churn":
        times = churn_times(SimpleNamespace(cfg=cfg, con=con, as_of=as_of, horizon=horizon_days))
        hold_from = times[-max(1, round(len(times) * tcfg.holdout_share))]  # as churn.train splits
        return [t for t in times if t + timedelta(days=horizon_days) <= hold_from]
    sends = exposure_labels(con, until=as_of - timedelta(hours=24))
    if model_name == "send_time":
        sends = sends[sends["channel"].isin(list(HOUR_PROFILE_CHANNELS))]
    if sends.empty:
        return []
    _, hold = split_by_time(sends, tcfg.holdout_share, tcfg.min_rows)
    boundary = to_utc(hold[TIMESTAMP_FIELD].min())
    every = tcfg.snapshot_every_days
    first_signup, _ = data_range(con)
    start = max(to_utc(sends[TIMESTAMP_FIELD].min()) - timedelta(days=every), first_signup + timedelta(days=1))
    return [t for t in snapshot_times(start, boundary, every) if t < boundary][-tcfg.max_snapshots:]


def snapshot_rows(home: Path, con, cfg, times: Sequence[datetime], columns: Sequence[str],
                  max_rows: int = REFERENCE_ROWS, seed: int = 0) -> pd.DataFrame:
    """``columns`` of the snapshot files at ``times`` (built when missing): at most ``max_rows`` rows, the same
    share of each file, sampled reproducibly."""
    missing = [t for t in times if not snapshot_file(home, t).exists()]
    if missing:
        build_snapshots(con, home, cfg.features, missing)
    per_file = max(1, max_rows // max(1, len(times)))
    rng = np.random.default_rng(seed)
    parts = []
    for t in times:
        path = snapshot_file(home, t)
        available = set(pq.read_schema(path).names)
        wanted = [c for c in dict.fromkeys([ENTITY, *stored_features(columns)]) if c in available]
        frame = expand_frame(pq.read_table(path, columns=wanted).to_pandas())
        if len(frame) > per_file:
            frame = frame.iloc[np.sort(rng.choice(len(frame), per_file, replace=False))]
        parts.append(frame)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=[ENTITY, *columns])


def profile(name: str, model, features: Sequence[str], rows: pd.DataFrame, source: dict) -> dict:
    """The reference profile of ``model`` over ``rows`` (features and scores), with where the rows came from."""
    feats = [f for f in model_columns(features) if f not in (ENTITY, TIMESTAMP_FIELD)]
    frame = rows.reindex(columns=feats)
    scores = model_scores(name, model, rows) if len(rows) else {}
    return {"version": PROFILE_VERSION, "model": name, "rows": len(rows), **source,
            "features": {f: column_profile(frame[f]) for f in feats},
            "scores": {s: column_profile(pd.Series(v)) for s, v in scores.items()}}


def build_reference(name: str, model, features: Sequence[str], home: Path, con, cfg, as_of: datetime,
                    horizon_days: int) -> dict:
    """A model's reference profile from the snapshots at its training times (see :func:`reference_times`)."""
    times = reference_times(con, cfg, name, to_utc(as_of), horizon_days)
    if not times:
        raise ValueError(f"no training snapshot times for {name} as of {to_utc(as_of):%Y-%m-%d}")
    rows = snapshot_rows(home, con, cfg, times, [*features, *SCORING_COLUMNS])
    return profile(name, model, features, rows, {"times": [t.isoformat() for t in times],
                                                 "trained_as_of": to_utc(as_of).isoformat()})


def log_reference(result, ctx) -> None:
    """Log the run's reference profile (called inside the MLflow run by ``registry.log_and_register``).

    A profile that cannot be built is a warning, not a failed training: `engage monitor` rebuilds it.
    """
    import mlflow

    try:
        ref = build_reference(result.model_name, result.python_model, result.features, ctx.home, ctx.con, ctx.cfg,
                              ctx.as_of, ctx.horizon)
    except Exception as exc:  # noqa: BLE001 - monitoring must never cost a trained model
        log.warning("no drift reference profile for %s: %s", result.model_name, exc)
        return
    mlflow.log_dict(ref, REFERENCE_ARTIFACT)
