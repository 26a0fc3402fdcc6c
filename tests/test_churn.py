"""Churn pipeline on a small simulated world: holdout discipline, quality floors, behaviour, bad inputs."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pandas as pd
import pytest

from engage.config import EngageConfig, TrainingConfig, load_config
from features.load import ingest
from training import churn
from training.base import TrainingError
from training.context import open_context


@pytest.fixture
def trained(trained_churn):
    return trained_churn



def test_training_snapshots_end_a_horizon_before_the_holdout(trained):
    ctx, result = trained
    snaps = result.tables["snapshots"]
    times = pd.to_datetime(snaps["snapshot_at"])
    train_t, hold_t = times[snaps["role"] == "train"], times[snaps["role"] == "holdout"]
    assert len(train_t) and len(hold_t)
    assert train_t.max() + timedelta(days=ctx.horizon) <= hold_t.min()
    assert result.holdout["event_timestamp"].min() >= hold_t.min()
    assert hold_t.max() + timedelta(days=ctx.horizon) <= ctx.as_of  # every holdout label is known


def test_quality_floors_against_baselines_and_oracle(trained):
    _, result = trained
    m = result.metrics
    assert m["roc_auc"] > 0.65
    assert m["roc_auc"] >= m["rfm_rule_roc_auc"] - 0.02
    assert m["lift_top_decile"] > 1.2
    assert m["auc_ratio_to_oracle"] > 0.85  # the benchmark reports the real figure on a bigger world


def test_calibrated_probabilities_match_the_holdout_rate(trained):
    _, result = trained
    p = result.python_model.predict(None, result.holdout)["churn_probability"]
    assert abs(p.mean() - result.holdout["churned"].mean()) < 0.06
    assert ((p >= 0) & (p <= 1)).all()


def test_risk_does_not_fall_when_recency_grows(trained):
    _, result = trained
    buyers = result.holdout[result.holdout["days_since_last_purchase"].notna()]
    rows = buyers.head(200).reset_index(drop=True)
    base = result.python_model.predict(None, rows)["churn_probability"].to_numpy()
    older = rows.assign(days_since_last_purchase=rows["days_since_last_purchase"] + 120)
    assert (result.python_model.predict(None, older)["churn_probability"].to_numpy() >= base - 1e-9).all()


def test_reason_codes_are_features_pushing_risk_up(trained):
    _, result = trained
    model = result.python_model
    X = model.prepare(result.holdout.head(200))  # >= BULK_ROWS: the tabulated TreeSHAP, not pred_contrib
    assert len(X) >= churn.BULK_ROWS
    contrib = model.booster.predict(X, pred_contrib=True)[:, :-1]
    np.testing.assert_allclose(model.contributions(X), contrib, rtol=0, atol=1e-9)
    for i, reasons in enumerate(model.reasons(X)):
        assert len(reasons) <= churn.TOP_REASONS
        for name in reasons:
            assert contrib[i, model.feature_names.index(name)] > 0


def test_one_customer_scores_as_in_a_matrix(trained):
    """A request's one row goes through LightGBM's single-row fast path: the same probability and SHAP values."""
    import cloudpickle

    _, result = trained
    model = result.python_model
    X = model.prepare(result.holdout.head(100))
    singles = np.concatenate([model.score_matrix(X[i:i + 1]) for i in range(len(X))])
    np.testing.assert_array_equal(singles, model.score_matrix(X))
    contrib = np.vstack([model.contributions(X[i:i + 1]) for i in range(len(X))])
    np.testing.assert_allclose(contrib, model.booster.predict(X, pred_contrib=True)[:, :-1], rtol=0, atol=1e-12)
    clone = cloudpickle.loads(cloudpickle.dumps(model))  # the fast path's C handles stay out of the pickle
    np.testing.assert_array_equal(clone.score_matrix(X[:1]), singles[:1])


def test_evaluate_on_unpickled_model_matches_train_metrics(trained):
    import cloudpickle

    _, result = trained
    clone = cloudpickle.loads(cloudpickle.dumps(result.python_model))
    assert churn.evaluate(clone, result.holdout)["roc_auc"] == pytest.approx(result.metrics["roc_auc"])


def test_too_little_data_for_a_holdout(sim_home):
    with open_context(sim_home, load_config(), horizon_days=330) as ctx, pytest.raises(TrainingError,
                                                                                      match="too little data"):
        churn.train(ctx)


def test_as_of_outside_the_data(sim_home):
    for bad in ("2019-01-01", "2031-01-01"):
        with pytest.raises(TrainingError, match="outside the data"), open_context(sim_home, load_config(), bad):
            pass


def test_single_class_labels_are_refused(tmp_path):
    """Customers who never buy: every label is 'churned'."""
    n = 60
    customers = pd.DataFrame({"customer_id": [f"S{i}" for i in range(n)], "signup_at": "2024-01-01T00:00:00Z"})
    days = pd.date_range("2024-01-02", "2024-12-30", freq="3D", tz="UTC")
    events = pd.DataFrame([(f"S{i}", d.isoformat(), "session") for i in range(n) for d in days],
                          columns=["customer_id", "event_at", "event_type"])
    src = tmp_path / "src"
    src.mkdir()
    customers.to_csv(src / "customers.csv", index=False)
    events.to_csv(src / "events.csv", index=False)
    ingest(src, tmp_path / "home")
    cfg = EngageConfig(training=TrainingConfig(min_rows=10))
    with open_context(tmp_path / "home", cfg) as ctx, pytest.raises(TrainingError, match="only one class"):
        churn.train(ctx)


def test_btyd_p_alive_falls_with_silence():
    from training.transforms import btyd_features

    df = pd.DataFrame({"orders_lifetime": [10, 10], "tenure_days": [400, 400], "days_since_last_purchase": [5, 200]})
    p = btyd_features(df)["btyd_p_alive"].to_numpy()
    assert p[0] > p[1] and np.all((p > 0) & (p <= 1))
