"""The champion models the service answers with: loaded from the MLflow registry, checked against
the feature store, and swapped atomically when an alias moves.

A :class:`ModelSet` is immutable; :class:`ModelManager` holds the current one in a single attribute, so
a request reads either the old set or the new one, never a mix. A reload that fails for any reason
(registry down, artifact missing, a feature the store does not serve) keeps the last good set and
records the error.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import mlflow
from feast import FeatureStore
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from serving.online import OnlineReader
from serving.scoring import POLICY_FEATURES, Scorer

log = logging.getLogger(__name__)
ALIAS = "champion"
MODEL_NAMES = ("churn", "next_best_offer", "send_time")


class ModelLoadError(RuntimeError):
    """A champion could not be loaded or does not fit the feature store."""


@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: str
    run_id: str
    trained_as_of: str
    feature_service: str
    features: list[str]
    model: object  # the unwrapped python model (ChurnModel, NextBestOfferModel, SendTimeModel)
    loaded_at: datetime

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version, "alias": ALIAS, "run_id": self.run_id,
                "trained_as_of": self.trained_as_of, "feature_service": self.feature_service,
                "n_features": len(self.features), "loaded_at": self.loaded_at.isoformat()}


@dataclass(frozen=True)
class ModelSet:
    """The loaded champions (any may be missing), with the reader and scorer built for them."""

    models: dict[str, LoadedModel] = field(default_factory=dict)
    reader: OnlineReader | None = None
    scorer: Scorer | None = None

    @property
    def versions(self) -> dict[str, str]:
        return {name: m.version for name, m in self.models.items()}

    @property
    def ready(self) -> bool:
        return bool(self.models) and self.reader is not None


def champion_versions(client: MlflowClient) -> dict[str, str]:
    """Which version holds the champion alias, per model name (models without one are left out)."""
    out = {}
    for name in MODEL_NAMES:
        try:
            out[name] = str(client.get_model_version_by_alias(name, ALIAS).version)
        except MlflowException as exc:
            if "RESOURCE_DOES_NOT_EXIST" not in str(exc.error_code) and "not found" not in str(exc).lower():
                raise
    return out


def _load_one(client: MlflowClient, store: FeatureStore, name: str, version: str) -> LoadedModel:
    mv = client.get_model_version(name, version)
    tags = mv.tags or {}
    service = tags.get("feature_service", "")
    features = json.loads(tags.get("features", "[]"))
    try:
        served = {f.name for p in store.get_feature_service(service).feature_view_projections for f in p.features}
    except Exception as exc:
        raise ModelLoadError(f"{name} v{version} was trained on feature service {service!r}, which the feature "
                             f"store does not have ({type(exc).__name__}): run `engage features apply`") from exc
    missing = [f for f in features if f not in served]
    if missing:
        raise ModelLoadError(f"{name} v{version} needs features the feature service {service!r} does not serve: "
                             f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    try:
        model = mlflow.pyfunc.load_model(f"models:/{name}/{version}").unwrap_python_model()
    except Exception as exc:
        raise ModelLoadError(f"{name} v{version} could not be loaded: {exc}") from exc
    warm = getattr(model, "warm", None)
    if callable(warm):  # the churn model's bulk reason-code tables: built once, before workers fork
        warm()
    return LoadedModel(name, version, mv.run_id or "", tags.get("trained_as_of", ""), service, features, model,
                       datetime.now(UTC))


def load_models(client: MlflowClient, store: FeatureStore, wanted: dict[str, str],
                previous: ModelSet | None = None) -> ModelSet:
    """Load ``wanted`` ({name: version}), reusing models of ``previous`` whose version did not change."""
    models = {}
    for name, version in wanted.items():
        old = previous.models.get(name) if previous else None
        models[name] = old if old is not None and old.version == version else _load_one(client, store, name, version)
    if not models:
        return ModelSet()
    reader = OnlineReader(store, sorted({m.feature_service for m in models.values()}), POLICY_FEATURES)
    get = {name: m.model for name, m in models.items()}
    scorer = Scorer(get.get("churn"), get.get("next_best_offer"), get.get("send_time"),
                    {name: m.version for name, m in models.items()})
    return ModelSet(models, reader, scorer)


class ModelManager:
    """Holds the current :class:`ModelSet`; reloads when a champion alias moves.

    Args:
        store: the Feast store (features are checked against it).
        client_factory: makes an MLflow client (called per reload, so a registry that was down at start
            is picked up later).
        on_reload: called with (changed, error) after every reload attempt (metrics).
    """

    def __init__(self, store: FeatureStore, client_factory: Callable[[], MlflowClient],
                 on_reload: Callable[[bool, str | None], None] | None = None):
        self.store = store
        self.client_factory = client_factory
        self.on_reload = on_reload
        self.current = ModelSet()
        self.last_error: str | None = None
        self.last_check: datetime | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def reload(self) -> tuple[bool, str | None]:
        """Load any champion that moved; returns (changed, error). On error the current set stays."""
        with self._lock:
            changed, error = False, None
            try:
                wanted = champion_versions(self.client_factory())
                if wanted != self.current.versions:
                    self.current = load_models(self.client_factory(), self.store, wanted, self.current)
                    changed = True
                    log.info("serving models: %s", ", ".join(f"{k} v{v}" for k, v in wanted.items()) or "none")
            except Exception as exc:  # keep serving the last good models
                error = f"{type(exc).__name__}: {exc}"
                log.error("model reload failed, still serving %s: %s", self.current.versions or "nothing", error)
            self.last_error, self.last_check = error, datetime.now(UTC)
        if self.on_reload:
            self.on_reload(changed, error)
        return changed, error

    def watch(self, interval_s: float) -> None:
        """Check the registry every ``interval_s`` seconds in a daemon thread (0 = never)."""
        if interval_s <= 0 or self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.wait(interval_s):
                self.reload()

        self._thread = threading.Thread(target=loop, name="engage-model-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def wait_until(predicate: Callable[[], bool], timeout_s: float, step_s: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``timeout_s`` passes (for tests and start-up)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return predicate()
