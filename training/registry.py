"""MLflow: one run per training call, a registered version per run, and the champion/challenger gate.

The tracking store defaults to SQLite under ``mlruns/`` in the repo (``MLFLOW_TRACKING_URI`` overrides
it). A new version is promoted to the ``champion`` alias only if it beats the current champion scored on
the new version's own holdout; otherwise it is aliased ``challenger`` and the reason is logged. If any
step after registration fails, the version is deleted and the run marked failed: nothing is left
half-registered.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from engage import profile
from engage.settings import REPO_ROOT
from training.base import TrainContext, TrainingError, TrainResult
from training.drift import log_reference

log = logging.getLogger(__name__)
CHAMPION, CHALLENGER = "champion", "challenger"
DEFAULT_EXPERIMENT = "engage"
MLRUNS = REPO_ROOT / "mlruns"


@dataclass(frozen=True)
class Registration:
    model_name: str
    version: str
    run_id: str
    alias: str  # champion or challenger
    reason: str
    metrics: dict[str, float]
    champion_metrics: dict[str, float] | None


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``; else ``ENGAGE_POSTGRES_URL`` under the production profile, else SQLite in mlruns/.

    A ``postgresql://`` URI is given the psycopg (3) driver, the one Engage ships.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or profile.default_tracking_uri() or f"sqlite:///{MLRUNS / 'mlflow.db'}"
    if uri.startswith(("postgresql://", "postgres://")):
        uri = profile.psycopg_url(uri)
    return uri


def artifact_root() -> str:
    return os.environ.get("ENGAGE_MLFLOW_ARTIFACTS") or str(MLRUNS / "artifacts")


def connect() -> MlflowClient:
    """Point MLflow at the configured store, checking that a local store is writable."""
    uri = tracking_uri()
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        db = Path(uri.removeprefix("sqlite:///"))
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(db if db.exists() else db.parent, os.W_OK):
                raise PermissionError(f"no write permission on {db}")
            sqlite3.connect(db).close()
        except (OSError, sqlite3.Error) as exc:
            raise TrainingError(f"the MLflow store {uri} is not writable: {exc}") from exc
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def _experiment_id(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=Path(artifact_root()).resolve().as_uri())


def champion_version(client: MlflowClient, model_name: str):
    try:
        return client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None


def _gate(client: MlflowClient, result: TrainResult) -> tuple[bool, str, dict[str, float] | None]:
    """Promote the first version; later ones only if they beat the champion on the same holdout."""
    current = champion_version(client, result.model_name)
    if current is None:
        return True, "first version of this model", None
    champion = mlflow.pyfunc.load_model(f"models:/{result.model_name}@{CHAMPION}").unwrap_python_model()
    try:
        champ_metrics = result.evaluate(champion, result.holdout)
    except Exception as exc:  # noqa: BLE001 - any failure to score the old version is a reason, not a crash
        return False, f"the champion (version {current.version}) could not be scored on this holdout: {exc}", None
    promote, reason = result.gate.decide(result.metrics, champ_metrics)
    return promote, f"{reason} (champion is version {current.version})", champ_metrics


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}


def log_and_register(result: TrainResult, ctx: TrainContext, experiment: str = DEFAULT_EXPERIMENT) -> Registration:
    """Log the run, register a version, gate it, and set its alias."""
    client = connect()
    exp_id = _experiment_id(client, experiment)
    version = None
    with mlflow.start_run(experiment_id=exp_id, run_name=f"{result.model_name} as of {ctx.as_of:%Y-%m-%d}") as run:
        try:
            mlflow.log_params(dict(result.params))
            mlflow.log_metrics(_finite(result.metrics))
            mlflow.set_tags({
                **result.tags,
                "feature_service": result.feature_service,
                "as_of": ctx.as_of.isoformat(),
                "holdout": result.holdout_description,
                "engage_home": str(ctx.home),
            })
            mlflow.log_dict({"feature_service": result.feature_service, "features": result.features},
                            "features.json")
            for plot in result.plots:
                mlflow.log_artifact(str(plot), artifact_path="plots")
            for name, table in result.tables.items():
                mlflow.log_table(table, artifact_file=f"tables/{name}.json")
            log_reference(result, ctx)  # the training data's profile, for `engage monitor`
            # Counts are integers in Feast but missing for a customer the online store lacks: record them
            # as doubles, or MLflow's schema enforcement would refuse exactly the rows serving must score.
            example = result.input_example.copy()
            ints = example.select_dtypes(include=["integer", "bool"]).columns
            example[ints] = example[ints].astype("float64")
            output = result.python_model.predict(None, example)
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=result.python_model,
                signature=infer_signature(example, output),
                input_example=example,
                registered_model_name=result.model_name,
                # Explicit requirements: inferring them would re-load the model in a subprocess.
                pip_requirements=_requirements(),
            )
            version = str(info.registered_model_version)
            client.set_model_version_tag(result.model_name, version, "feature_service", result.feature_service)
            client.set_model_version_tag(result.model_name, version, "features", json.dumps(result.features))
            client.set_model_version_tag(result.model_name, version, "trained_as_of", ctx.as_of.isoformat())
            client.set_model_version_tag(result.model_name, version, "run_id", run.info.run_id)
            promote, reason, champ_metrics = _gate(client, result)
            alias = CHAMPION if promote else CHALLENGER
            client.set_registered_model_alias(result.model_name, alias, version)
            mlflow.set_tags({"gate_decision": alias, "gate_reason": reason, "model_version": version})
            if champ_metrics:
                mlflow.log_metrics({f"champion_{k}": v for k, v in _finite(champ_metrics).items()})
        except BaseException:
            if version is not None:
                client.delete_model_version(result.model_name, version)
            raise
    return Registration(result.model_name, version, run.info.run_id, alias, reason, result.metrics, champ_metrics)


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("lightgbm", "scikit-learn", "pandas", "numpy", "mlflow")]


def promote(model_name: str, version: str) -> str:
    """Manual promotion: move the champion alias to ``version``; returns the previous champion's version."""
    client = connect()
    try:
        client.get_model_version(model_name, version)
    except MlflowException as exc:
        raise TrainingError(f"model {model_name} has no version {version}") from exc
    previous = champion_version(client, model_name)
    client.set_registered_model_alias(model_name, CHAMPION, version)
    if previous is not None and previous.version != version:
        client.set_registered_model_alias(model_name, CHALLENGER, previous.version)
    return str(previous.version) if previous else ""


def versions(model_name: str | None = None) -> list[dict]:
    """Every registered version with its aliases and its run's holdout metrics (newest first)."""
    client = connect()
    filt = f"name = '{model_name}'" if model_name else ""
    rows = []
    aliases: dict[str, dict[str, list[str]]] = {}
    for mv in client.search_model_versions(filt):
        if mv.name not in aliases:
            by_version: dict[str, list[str]] = {}
            for alias, v in client.get_registered_model(mv.name).aliases.items():
                by_version.setdefault(str(v), []).append(alias)
            aliases[mv.name] = by_version
        run = client.get_run(mv.run_id) if mv.run_id else None
        rows.append({
            "model": mv.name,
            "version": int(mv.version),
            "aliases": sorted(aliases[mv.name].get(str(mv.version), [])),
            "run_id": mv.run_id,
            "created": mv.creation_timestamp,
            "as_of": (mv.tags or {}).get("trained_as_of", ""),
            "feature_service": (mv.tags or {}).get("feature_service", ""),
            "metrics": dict(run.data.metrics) if run else {},
            "gate_reason": run.data.tags.get("gate_reason", "") if run else "",
        })
    return sorted(rows, key=lambda r: (r["model"], -r["version"]))
