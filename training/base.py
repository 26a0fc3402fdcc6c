"""What every training pipeline takes and returns, so MLflow logging and the gate live in one place.

A pipeline (``churn.py``, ``next_best_offer.py``, ``send_time.py``) is a function
``train(ctx: TrainContext) -> TrainResult``: it builds its training set from Feast, fits, evaluates on a
time-based holdout and returns the model with its metrics. ``registry.py`` logs, registers and gates it.
A pipeline also exposes ``evaluate(model, holdout) -> metrics`` so that the current champion can be
scored on the challenger's holdout: the gate compares the two on the same data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only for annotations: `engage --help` must not pay for importing Feast
    import duckdb
    import pandas as pd
    from feast import FeatureStore

    from engage.config import EngageConfig

MODEL_NAMES = {"churn": "churn", "nbo": "next_best_offer", "send-time": "send_time"}


class TrainingError(RuntimeError):
    """Training cannot go on (too little data, one class, no exposures...); the message says why."""


class MissingExposures(TrainingError):
    """The model learns from the exposures log and there is none."""


@dataclass
class TrainContext:
    """Everything a pipeline reads: the warehouse, the feature store, settings and the data cutoff.

    ``as_of`` is the data cutoff: nothing at or after it is used. ``truth`` is the simulator's ground
    truth when the loaded data came from it (None for real data).
    """

    home: Path
    con: duckdb.DuckDBPyConnection
    store: FeatureStore
    cfg: EngageConfig
    as_of: datetime
    workdir: Path
    truth: pd.DataFrame | None = None
    horizon_days: int | None = None

    @property
    def horizon(self) -> int:
        return self.horizon_days or self.cfg.training.horizon_days


@dataclass
class GateRule:
    """How a challenger must compare with the champion on the same holdout to be promoted."""

    metric: str  # the main metric, higher is better
    not_worse: tuple[str, ...] = ()  # metrics where lower is better and the challenger must not be worse
    tolerance: float = 1e-9

    def decide(self, challenger: dict[str, float], champion: dict[str, float]) -> tuple[bool, str]:
        c, k = challenger[self.metric], champion[self.metric]
        if not c > k + self.tolerance:
            return False, f"{self.metric} {c:.4f} does not beat the champion's {k:.4f} on the same holdout"
        for m in self.not_worse:
            if challenger[m] > champion[m] + self.tolerance:
                return False, f"{m} {challenger[m]:.4f} is worse than the champion's {champion[m]:.4f}"
        return True, f"{self.metric} {c:.4f} beats the champion's {k:.4f} on the same holdout"


@dataclass
class TrainResult:
    """A fitted model, ready to log: the pyfunc, its files, and what it scored on its holdout."""

    model_name: str  # registered model name
    feature_service: str
    features: list[str]
    python_model: Any  # an mlflow.pyfunc.PythonModel
    artifacts: dict[str, str]  # name -> local file the PythonModel loads in load_context
    input_example: pd.DataFrame
    params: dict[str, Any]
    metrics: dict[str, float]  # holdout metrics, including the gate's
    gate: GateRule
    holdout: Any  # what ``evaluate`` needs to score another version on the same holdout
    evaluate: Callable[[Any, Any], dict[str, float]]  # (loaded pyfunc model, holdout) -> metrics
    holdout_description: str
    plots: list[Path] = field(default_factory=list)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # logged as CSV artifacts
    tags: dict[str, str] = field(default_factory=dict)
