"""MLflow registry: first version is champion, the gate on the same holdout, nothing half-registered."""

from __future__ import annotations

import dataclasses
import json

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from features.catalog import model_columns
from training import churn, registry
from training.base import GateRule, TrainingError


@pytest.fixture
def trained(trained_churn):
    return trained_churn



def _weak(result):
    """The same pipeline output with a model that ranks nobody: AUC 0.5."""
    model = churn.ChurnModel(result.python_model.booster, result.python_model.matrix,
                             np.array([0.0, 1.0]), np.array([0.5, 0.5]), result.python_model.horizon_days)
    return dataclasses.replace(result, python_model=model, metrics=churn.evaluate(model, result.holdout))


def _aliases(name):
    return {alias: str(v) for alias, v in MlflowClient().get_registered_model(name).aliases.items()}


def test_first_version_is_champion_with_signature_and_features(trained, mlflow_uri):
    ctx, result = trained
    reg = registry.log_and_register(result, ctx)
    assert (reg.version, reg.alias) == ("1", "champion")
    client = MlflowClient()
    mv = client.get_model_version("churn", "1")
    assert mv.tags["feature_service"] == "churn"
    assert json.loads(mv.tags["features"]) == result.features
    info = mlflow.models.get_model_info("models:/churn@champion")
    assert info.signature is not None and info.saved_input_example_info is not None
    loaded = mlflow.pyfunc.load_model("models:/churn@champion")
    rows = result.holdout[model_columns(result.features)].head(3).reset_index(drop=True)
    ints = rows.select_dtypes(include=["integer", "bool"]).columns
    rows[ints] = rows[ints].astype("float64")  # the signature's contract: numeric features are doubles
    assert len(loaded.predict(rows)) == 3
    assert len(loaded.predict(rows.assign(orders_30d=np.nan))) == 3  # a missing count is accepted
    run = client.get_run(reg.run_id)
    assert run.data.metrics["roc_auc"] == pytest.approx(result.metrics["roc_auc"])
    assert any(a.path == "plots" for a in client.list_artifacts(reg.run_id))


def test_gate_keeps_champion_unless_beaten_on_same_holdout(trained, mlflow_uri):
    ctx, result = trained
    weak = _weak(result)
    first = registry.log_and_register(weak, ctx)
    assert first.alias == "champion"
    better = registry.log_and_register(result, ctx)
    assert better.alias == "champion" and "beats" in better.reason
    assert better.champion_metrics["roc_auc"] == pytest.approx(0.5)  # the old champion, scored on this holdout
    again = registry.log_and_register(result, ctx)  # same data, same model: not better
    assert again.alias == "challenger" and "does not beat" in again.reason
    worse = registry.log_and_register(weak, ctx)
    assert worse.alias == "challenger"
    assert _aliases("churn") == {"champion": better.version, "challenger": worse.version}
    tags = MlflowClient().get_run(again.run_id).data.tags
    assert tags["gate_decision"] == "challenger" and "does not beat" in tags["gate_reason"]


def test_gate_rule_needs_brier_not_worse():
    rule = GateRule(metric="roc_auc", not_worse=("brier",))
    assert rule.decide({"roc_auc": 0.8, "brier": 0.2}, {"roc_auc": 0.7, "brier": 0.2})[0]
    ok, reason = rule.decide({"roc_auc": 0.8, "brier": 0.25}, {"roc_auc": 0.7, "brier": 0.2})
    assert not ok and "brier" in reason


def test_failure_after_registration_leaves_nothing_registered(trained, mlflow_uri, monkeypatch):
    ctx, result = trained

    def broken_gate(*_):
        raise RuntimeError("disk full")

    monkeypatch.setattr(registry, "_gate", broken_gate)
    with pytest.raises(RuntimeError, match="disk full"):
        registry.log_and_register(result, ctx)
    client = MlflowClient()
    assert client.search_model_versions("name = 'churn'") == []
    runs = client.search_runs([client.get_experiment_by_name("engage").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_unwritable_store_is_a_clear_error(trained, tmp_path, monkeypatch):
    ctx, result = trained
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker}/mlflow.db")
    with pytest.raises(TrainingError, match="not writable"):
        registry.log_and_register(result, ctx)


def test_manual_promotion(trained, mlflow_uri):
    ctx, result = trained
    registry.log_and_register(result, ctx)
    registry.log_and_register(result, ctx)
    assert registry.promote("churn", "2") == "1"
    assert _aliases("churn") == {"champion": "2", "challenger": "1"}
    with pytest.raises(TrainingError, match="no version 7"):
        registry.promote("churn", "7")
