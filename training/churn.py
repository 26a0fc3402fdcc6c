"""Churn model: P(no purchase in the next H days), LightGBM with calibration, baselines and reason codes."""

from __future__ import annotations

import logging
from datetime import timedelta

import lightgbm as lgb
import mlflow.pyfunc
import numpy as np
import pandas as pd
from sklearn.impute import SimpleImputer
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from features.catalog import model_columns, service_features
from features.labels import churn_labels
from features.snapshots import profile_columns, to_utc
from features.store import historical_features
from training import plots
from training.base import GateRule, TrainContext, TrainingError, TrainResult
from training.datasets import churn_dataset, churn_times, describe_window, ensure_snapshots
from training.evaluate import binary_metrics
from training.matrix import FeatureMatrix
from training.row_predict import RowPredictor
from training.transforms import BTYD_FEATURES, with_btyd
from training.treeshap import TreeShap, TreeShapUnsupported, top_positive

log = logging.getLogger(__name__)
MODEL_NAME = "churn"
SERVICE = "churn"
TOP_REASONS = 3
# From this many rows on, reason codes come from TreeShap's tables instead of one pred_contrib per row.
BULK_ROWS = 64
# Shallow trees with large leaves: churn risk is a few smooth effects, and a customer's weekly snapshots are
# near copies of each other, so small leaves fit individual customers. On the simulator (10k customers) 7 leaves
# of at least 1/600 of the rows lift the ROC AUC at truth_at from 0.804 to 0.809 against 31 leaves of 40 rows.
MAX_LEAVES = 7
MIN_LEAF_SHARE = 600
MONOTONE = {
    "days_since_last_purchase": 1, "days_since_last_activity": 1, "btyd_p_alive": -1, "btyd_expected_purchases_90d": -1,
}


class ChurnModel(mlflow.pyfunc.PythonModel):
    """A calibrated LightGBM churn model with per-customer reason codes.

    ``predict`` takes rows of the ``churn`` feature service; serving can call ``prepare`` once and
    then ``score_matrix`` / ``reasons`` on the raw booster without DataFrames.
    """

    def __init__(self, booster: lgb.Booster, matrix: FeatureMatrix, calib_x: np.ndarray, calib_y: np.ndarray,
                 horizon_days: int):
        self.booster = booster
        self.matrix = matrix
        self.calib_x = calib_x
        self.calib_y = calib_y
        self.horizon_days = horizon_days

    @property
    def feature_names(self) -> list[str]:
        return self.matrix.columns_

    def prepare(self, df: pd.DataFrame) -> np.ndarray:
        """The booster's input matrix from a frame of service features (BTYD features added)."""
        return self.matrix.transform(with_btyd(df, self.horizon_days))

    def score_matrix(self, X: np.ndarray) -> np.ndarray:
        raw = self._rows().predict(X)
        return np.interp(raw, self.calib_x, self.calib_y)

    def reasons(self, X: np.ndarray, k: int = TOP_REASONS) -> list[list[str]]:
        """Per row, the ``k`` features pushing risk up the most (SHAP values of the raw score, largest first)."""
        return top_positive(self.contributions(X), self.matrix.columns_, k)

    def contributions(self, X: np.ndarray) -> np.ndarray:
        """Per row and feature, the SHAP value of the raw score: LightGBM ``pred_contrib`` without the bias.

        The same values come from :class:`training.treeshap.TreeShap`'s tables (built on first use, see
        :meth:`warm`): from :data:`BULK_ROWS` rows on vectorized over the rows (about 10x faster per row than
        LightGBM), below it a row at a time vectorized over the trees (a scoring request's customer). A booster
        whose trees are too large to tabulate goes to LightGBM.
        """
        shap = self.warm()
        if shap is None:
            return self._rows().predict(X, "contrib")[:, :-1]  # last column: bias
        if len(X) >= BULK_ROWS:
            return shap.contributions(X)
        return np.array([shap.row_contributions(row) for row in X]).reshape(len(X), shap.num_features)

    def _rows(self) -> RowPredictor:
        """The booster behind LightGBM's single-row fast path (a request's one customer), made on first use."""
        rows = self.__dict__.get("_row_predictor")
        if rows is None:
            rows = self.__dict__["_row_predictor"] = RowPredictor(self.booster)
        return rows

    def warm(self) -> TreeShap | None:
        """Build the bulk explainer now (about a second); None when the trees are too large to tabulate."""
        shap = self.__dict__.get("_tree_shap")
        if shap is None:
            try:
                shap = TreeShap(self.booster)
            except TreeShapUnsupported as exc:
                log.info("reason codes use LightGBM pred_contrib: %s", exc)
                shap = False
            self.__dict__["_tree_shap"] = shap
        return shap or None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_tree_shap", None)  # derived from the booster; rebuilt where it is used
        state.pop("_row_predictor", None)  # C handles
        return state

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        X = self.prepare(model_input)
        out = pd.DataFrame({"churn_probability": self.score_matrix(X)})
        reasons = self.reasons(X)
        for r in range(TOP_REASONS):
            out[f"reason_{r + 1}"] = [row[r] if len(row) > r else "" for row in reasons]
        return out


def _recency_weights(ts: pd.Series, half_life_days: float) -> np.ndarray:
    age = (ts.max() - ts).dt.total_seconds().to_numpy() / 86400.0
    return np.power(0.5, age / half_life_days)


def _rfm_rule(df: pd.DataFrame) -> np.ndarray:
    """Baseline: risk grows with days since the last purchase, shrinks with last-year orders."""
    recency = pd.to_numeric(df["days_since_last_purchase"], errors="coerce")
    recency = recency.fillna(pd.to_numeric(df["tenure_days"], errors="coerce")).to_numpy(float)
    orders = pd.to_numeric(df["orders_365d"], errors="coerce").fillna(0).to_numpy(float)
    return recency / (1.0 + orders)


def _split_train(train: pd.DataFrame, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Validation slice for early stopping and calibration: 20% of customers (all their snapshots)."""
    rng = np.random.default_rng(seed)
    customers = train["customer_id"].unique()
    val_ids = set(rng.choice(customers, size=max(1, len(customers) // 5), replace=False))
    is_val = train["customer_id"].isin(val_ids).to_numpy()
    return ~is_val, is_val


def _check_classes(y: np.ndarray, where: str) -> None:
    if len(np.unique(y)) < 2:
        only = "churned" if y.size and y[0] else "stayed"
        raise TrainingError(f"only one class in the {where} labels (every customer {only}): "
                            "a churn model needs both; load more customers or a longer history")


def evaluate(model: ChurnModel, holdout: pd.DataFrame) -> dict[str, float]:
    """Holdout metrics of any churn model version on the same rows."""
    p = model.score_matrix(model.prepare(holdout))
    return binary_metrics(holdout["churned"].to_numpy(), p)


def _truth_metrics(ctx: TrainContext, model: ChurnModel) -> tuple[dict[str, float], dict]:
    """Model AUC against the simulator's true churn probability at ``truth_at``, on the same customers."""
    truth = ctx.truth
    if truth is None or "true_churn_prob" not in truth:
        return {}, {}
    truth_at = to_utc(pd.Timestamp(truth["truth_at"].iloc[0]))
    if truth_at + timedelta(days=ctx.horizon) > ctx.as_of:
        log.info("ground truth at %s is past the data cutoff: no oracle comparison", truth_at)
        return {}, {}
    ensure_snapshots(ctx, [truth_at])
    labels = churn_labels(ctx.con, [truth_at], ctx.horizon, ctx.cfg.training.churn_on, cutoff=ctx.as_of)
    feats = historical_features(ctx.store, SERVICE, labels[["customer_id", "event_timestamp"]])
    df = labels.merge(feats, on=["customer_id", "event_timestamp"]).merge(
        truth[["customer_id", "true_churn_prob"]], on="customer_id"
    ).dropna(subset=["true_churn_prob"])
    y = df["churned"].to_numpy()
    if len(np.unique(y)) < 2:
        return {}, {}
    p = model.score_matrix(model.prepare(df))
    oracle = df["true_churn_prob"].to_numpy()
    model_auc, oracle_auc = roc_auc_score(y, p), roc_auc_score(y, oracle)
    return (
        {"truth_roc_auc": model_auc, "oracle_roc_auc": oracle_auc, "auc_ratio_to_oracle": model_auc / oracle_auc},
        {"y": y, "model": p, "oracle": oracle},
    )


def train(ctx: TrainContext) -> TrainResult:
    tcfg = ctx.cfg.training
    times = churn_times(ctx)
    df = churn_dataset(ctx, times)
    # Time-based holdout: the latest snapshot times; training snapshots end a horizon before them so no
    # training label looks at days the holdout's features are computed at.
    n_hold = max(1, round(len(times) * tcfg.holdout_share))
    hold_from = times[-n_hold]
    train_df = df[df["event_timestamp"] + pd.Timedelta(days=ctx.horizon) <= hold_from]
    hold_df = df[df["event_timestamp"] >= hold_from]
    if len(train_df) < tcfg.min_rows or len(hold_df) < max(10, tcfg.min_rows // 10):
        raise TrainingError(
            f"too little data for a holdout: {len(train_df)} training rows and {len(hold_df)} holdout rows "
            f"after keeping a {ctx.horizon}-day gap between them (need {tcfg.min_rows}); "
            "load more history or lower --horizon-days"
        )
    y_train, y_hold = train_df["churned"].to_numpy(), hold_df["churned"].to_numpy()
    _check_classes(y_train, "training")
    _check_classes(y_hold, "holdout")

    features = service_features(SERVICE, profile_columns(ctx.con))
    train_full = with_btyd(train_df, ctx.horizon)
    matrix = FeatureMatrix(model_columns(features) + BTYD_FEATURES).fit(train_full)
    X = matrix.transform(train_full)
    weights = _recency_weights(train_df["event_timestamp"].reset_index(drop=True), tcfg.recency_half_life_days)
    fit_idx, val_idx = _split_train(train_df.reset_index(drop=True), tcfg.seed)
    params = {
        "objective": "binary", "learning_rate": tcfg.learning_rate, "num_leaves": min(tcfg.num_leaves, MAX_LEAVES),
        "min_data_in_leaf": max(40, int(fit_idx.sum()) // MIN_LEAF_SHARE), "feature_fraction": 0.8,
        "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0, "seed": tcfg.seed, "deterministic": True,
        "num_threads": 2, "verbose": -1,
    }
    cats = [matrix.columns_.index(c) for c in matrix.categorical_]
    # Domain knowledge the data is too small to always find: longer silence never lowers risk.
    params["monotone_constraints"] = [MONOTONE.get(c, 0) for c in matrix.columns_]
    dtrain = lgb.Dataset(X[fit_idx], y_train[fit_idx], weight=weights[fit_idx], feature_name=matrix.columns_,
                         categorical_feature=cats, free_raw_data=False)
    dval = lgb.Dataset(X[val_idx], y_train[val_idx], weight=weights[val_idx], reference=dtrain)
    booster = lgb.train(params, dtrain, num_boost_round=tcfg.num_boost_round, valid_sets=[dval],
                        callbacks=[lgb.early_stopping(30, verbose=False)])
    raw_val = booster.predict(X[val_idx], num_iteration=booster.best_iteration)
    iso = IsotonicRegression(out_of_bounds="clip", y_min=1e-4, y_max=1 - 1e-4).fit(
        raw_val, y_train[val_idx], sample_weight=weights[val_idx]
    )
    booster = booster.model_from_string(booster.model_to_string(num_iteration=booster.best_iteration))
    model = ChurnModel(booster, matrix, np.asarray(iso.X_thresholds_), np.asarray(iso.y_thresholds_), ctx.horizon)

    metrics = evaluate(model, hold_df)
    X_hold = model.prepare(hold_df)
    p_hold = model.score_matrix(X_hold)
    rfm = _rfm_rule(hold_df)
    logreg = make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler(),
                           LogisticRegression(max_iter=2000))
    logreg.fit(X[:, _numeric(matrix)], y_train, logisticregression__sample_weight=weights)
    p_logreg = logreg.predict_proba(X_hold[:, _numeric(matrix)])[:, 1]
    metrics["rfm_rule_roc_auc"] = float(roc_auc_score(y_hold, rfm))
    metrics.update(binary_metrics(y_hold, p_logreg, prefix="logreg_"))
    metrics["best_iteration"] = float(booster.current_iteration())
    metrics["holdout_churn_rate"] = float(y_hold.mean())
    truth_metrics, truth_scores = _truth_metrics(ctx, model)
    metrics.update(truth_metrics)

    w = ctx.workdir
    roc_scores = {"lightgbm": p_hold, "logistic regression": p_logreg, "RFM rule": rfm}
    out_plots = [
        plots.roc_plot(y_hold, roc_scores, w / "churn_roc.png", "ROC (holdout)"),
        plots.calibration_plot(y_hold, {"lightgbm (calibrated)": p_hold, "logistic regression": p_logreg},
                               w / "churn_calibration.png"),
        plots.lift_plot(y_hold, p_hold, w / "churn_lift.png"),
        plots.importance_plot(matrix.columns_, booster.feature_importance("gain"), w / "churn_importance.png"),
    ]
    if truth_scores:
        out_plots.append(plots.roc_plot(truth_scores["y"], {"lightgbm": truth_scores["model"],
                                                            "oracle (true probability)": truth_scores["oracle"]},
                                        w / "churn_roc_vs_oracle.png", "ROC at truth_at: model vs oracle"))
    example = hold_df[model_columns(features)].head(5).reset_index(drop=True)
    return TrainResult(
        model_name=MODEL_NAME,
        feature_service=SERVICE,
        features=features,
        python_model=model,
        artifacts={},
        input_example=example,
        params={**params, "horizon_days": ctx.horizon, "churn_on": tcfg.churn_on, "snapshots": len(times),
                "recency_half_life_days": tcfg.recency_half_life_days, "calibration": "isotonic"},
        metrics=metrics,
        gate=GateRule(metric="roc_auc", not_worse=("brier",)),
        holdout=hold_df,
        evaluate=evaluate,
        holdout_description=f"churn snapshots {describe_window(hold_df)}",
        plots=out_plots,
        tables={"snapshots": pd.DataFrame({
            "snapshot_at": [t.isoformat() for t in times],
            "role": ["holdout" if t >= hold_from else
                     ("train" if t + timedelta(days=ctx.horizon) <= hold_from else "gap") for t in times],
        })},
        tags={"label": f"no {tcfg.churn_on} in {ctx.horizon} days"},
    )


def _numeric(matrix: FeatureMatrix) -> list[int]:
    """Columns for the linear baseline: everything but category codes (meaningless as numbers)."""
    return [i for i, c in enumerate(matrix.columns_) if c not in matrix.categories_]
