"""The scoring service without HTTP: features -> models -> policy -> decision log -> answer.

``app.py`` wraps it in FastAPI; the serving benchmark calls it in-process as the floor's neighbour.
One answer: read the customers' online features once, score with the champion models
(``scoring.py``), decide under the policy (``decide.py``), append every decision to the decision
log (buffered, never blocking the answer) and return it.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import mlflow
from mlflow.tracking import MlflowClient

from engage.config import config_path, load_config
from features.store import open_store
from serving.decide import decide
from serving.decision_log import DecisionLog, decision_record
from serving.feedback import Feedback, FeedbackStore, RecordResult, StoreUnavailable
from serving.metrics import Metrics
from serving.models import MODEL_NAMES, ModelManager, ModelSet
from serving.online import Freshness, OnlineStoreUnavailable, drop_stale
from serving.policy import Policy, load_policy
from serving.schemas import FeedbackIn, Recommendation, RecommendationRequest
from serving.servingdb import create_serving_engine, create_tables
from serving.settings import ServingSettings
from serving.suppression import SuppressionList
from serving.types import Decision
from training.registry import tracking_uri

log = logging.getLogger(__name__)


class NotReady(RuntimeError):
    """No model is loaded (or the feature store is not there): scoring answers 503."""


def registry_client() -> MlflowClient:
    uri = tracking_uri()
    _check_reachable(uri)
    mlflow.set_tracking_uri(uri)  # models:/ URIs resolve against the global registry
    return MlflowClient(tracking_uri=uri)


def _check_reachable(uri: str, timeout_s: int = 3) -> None:
    """Fail fast when a PostgreSQL registry is down: MLflow itself retries opening its store for ~100 s, which
    would hold the service's start and every registry check."""
    if not uri.startswith("postgresql"):
        return
    import psycopg
    from sqlalchemy.engine import make_url

    conninfo = make_url(uri).set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        psycopg.connect(conninfo, connect_timeout=timeout_s).close()
    except psycopg.Error as exc:
        raise ConnectionError(f"the MLflow registry database is unreachable: {str(exc).splitlines()[0]}") from exc


def to_response(d: Decision, request_id: str, exposure_id: str | None) -> Recommendation:
    return Recommendation(
        request_id=request_id, exposure_id=exposure_id, customer_id=d.customer_id, action=d.action, reason=d.reason,
        churn_probability=d.churn_probability, risk_tier=d.risk_tier, segment=d.segment, reason_codes=d.reasons,
        expected_value_at_risk=d.expected_value_at_risk, offers=[vars(o) for o in d.offers],
        chosen_offer=d.chosen_offer, channel=d.channel, send_at=d.send_at, send_at_local=d.send_at_local,
        expected_open_rate=d.expected_open_rate, propensity=d.propensity, channels=[vars(c) for c in d.channels],
        suppressions=[vars(s) for s in d.suppressions], cold_start=d.cold_start, degraded=d.degraded,
        feature_timestamp=d.feature_timestamp, model_versions=d.model_versions, holdout=d.holdout,
        intended_action=d.intended_action, feature_age_seconds=d.feature_age_s, stale_features=bool(d.stale_views),
        stale_views=d.stale_views, missing_models=d.missing_models,
    )


class EngageService:
    def __init__(self, settings: ServingSettings, metrics: Metrics | None = None):
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.policy: Policy = load_policy(settings.policy_path)
        # Age limits of the online feature views, seconds (engage.yaml serving.feature_max_age_days)
        self.max_age_s = {v: days * 86400.0 for v, days in load_config(config_path(settings.home)).feature_max_ages()
                          .items()}
        # Nothing here needs a database to answer: Feast opens its registry on first use, the serving tables
        # are created once the database answers (start, every registry check, or the first feedback), so a
        # service whose PostgreSQL is down starts not-ready and becomes ready when it appears.
        self.store = open_store(settings.home)
        self.models = ModelManager(self.store, registry_client, self._on_reload)
        self.engine = create_serving_engine(settings.serving_db_url, home=settings.home, create=False)
        self._db_ready = False
        self._db_error: str | None = None
        self._db_lock = threading.Lock()
        self.decisions = DecisionLog(self.engine, flush_interval_s=settings.decision_flush_s)
        self.feedback = FeedbackStore(self.engine, self.decisions)
        # A database over the network (PostgreSQL): the contact-history query runs on this thread while the
        # request's features are read and scored, so its round trip is not added to theirs. SQLite answers in
        # the process in less time than the hand-over would cost.
        self._history = (ThreadPoolExecutor(1, thread_name_prefix="engage-contact-history")
                         if self.engine.dialect.name != "sqlite" else None)
        self._longest_cap = timedelta(days=self.policy.contact_caps.longest_days)
        self.suppressed = SuppressionList(self.engine, settings.home)  # `engage forget`; refreshed in _on_reload
        self.metrics.on_collect(self._collect)

    # -- life cycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self.ensure_db()
        self.decisions.start()
        self.models.reload()
        self.models.watch(self.settings.reload_interval_s)

    def close(self) -> None:
        self.models.stop()
        if self._history is not None:
            self._history.shutdown(wait=True)
        self.decisions.close()
        self.feedback.close()

    def ensure_db(self) -> bool:
        """Create the serving tables if that has not been done yet; False while the database is unreachable."""
        if self._db_ready:
            return True
        with self._db_lock:
            if not self._db_ready:
                try:
                    create_tables(self.engine)
                    self._db_ready, self._db_error = True, None
                except Exception as exc:  # noqa: BLE001 - unreachable, refused, auth: all mean "not yet"
                    self._db_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    log.warning("serving database not available: %s", self._db_error)
        return self._db_ready

    def ready(self) -> tuple[bool, str]:
        current = self.models.current
        if not current.models:
            why = self.models.last_error or "no champion model in the registry: run `engage train all`"
            return False, f"no models loaded ({why})"
        if not self.ensure_db():
            return False, f"serving database unavailable ({self._db_error})"
        if not self.suppressed.loaded:  # answering without it could recommend for a forgotten customer
            return False, f"suppression list unavailable ({self.suppressed.error})"
        return True, "ok"

    def _on_reload(self, changed: bool, error: str | None) -> None:
        self.ensure_db()  # the registry check doubles as the retry of a database that was down at start
        self.suppressed.refresh()  # and as the reload of the suppression list (a failure keeps the last one)
        self.metrics.export_drift(self.settings.home)  # the latest `engage monitor` results, as gauges
        self.metrics.reloads.labels("failed" if error else ("changed" if changed else "unchanged")).inc()
        for name, version in self.models.current.versions.items():
            self.metrics.model_version.labels(name).set(float(version))

    def _collect(self) -> None:
        stats = self.decisions.stats
        self.metrics.decision_log_pending.set(stats.pending)
        self.metrics.decision_log_dropped.set(stats.dropped)
        self.metrics.decision_log_errors.set(stats.flush_errors)
        self.metrics.models_ready.set(1.0 if self.ready()[0] else 0.0)

    # -- answers ----------------------------------------------------------------------------------
    def recommend(self, requests: Sequence[RecommendationRequest], source: str = "api") -> list[Recommendation]:
        """One answer per request, from one feature read and one scoring pass for all of them."""
        current: ModelSet = self.models.current
        if not current.models or current.reader is None or current.scorer is None or not self.suppressed.loaded:
            raise NotReady(self.ready()[1])
        ids = [r.customer_id for r in requests]
        request_id, decided_at = uuid.uuid4().hex, datetime.now(UTC)
        times = [r.now or decided_at for r in requests]
        degraded = False
        history = self._start_recent_sends(ids, times)
        try:
            rows = current.reader.read(ids)
            fresh = drop_stale(rows, current.reader.view_features, self.max_age_s, times)
            values, stamps = rows.values, rows.timestamps
        except OnlineStoreUnavailable as exc:
            log.warning("answering from defaults: %s", exc)
            values, stamps, degraded = {}, [None] * len(ids), True
            fresh = Freshness([None] * len(ids), [[] for _ in ids])
        scores = current.scorer.score(ids, values, stamps, degraded=degraded)
        recent = self._recent_sends(ids, stamps, history)
        missing = [name for name in MODEL_NAMES if name not in current.models]
        out = []
        for i, (req, sc) in enumerate(zip(requests, scores, strict=True)):
            if sc.cold_start or sc.degraded:  # nothing known about this customer: no risk score to explain
                sc.churn_probability, sc.churn_reasons = None, []
            suppressed = req.customer_id in self.suppressed
            d = decide(sc, self.policy, times[i], channels=req.channels, max_offers=req.max_offers,
                       recent_contacts=recent.get(req.customer_id, ()), request_id=request_id, suppressed=suppressed)
            d.feature_age_s, d.stale_views, d.missing_models = fresh.ages[i], fresh.stale[i], missing
            exposure_id = uuid.uuid4().hex if d.action != "none" else None
            if not suppressed:  # a forgotten customer's id is not written anywhere again
                self.decisions.append(decision_record(d, request_id, exposure_id, decided_at, source))
            self.metrics.actions.labels(d.action).inc()
            out.append(to_response(d, request_id, exposure_id))
        self.metrics.customers.labels(source).inc(len(out))
        self.metrics.cold_starts.inc(sum(s.cold_start for s in scores))
        self.metrics.degraded.inc(sum(s.degraded for s in scores))
        self.metrics.stale.inc(sum(bool(v) for v in fresh.stale))
        return out

    def _start_recent_sends(self, ids: list[str], times: list[datetime]) -> Future | None:
        """The contact-history query on its own thread (network databases only), before the features are read.

        The oldest feature time it will be filtered by is not known yet, so it asks from the start of the
        longest contact-cap window before the earliest request time: an older send is outside every cap window
        the policy checks, so the decisions come out as with the exact bound.
        """
        if self._history is None:
            return None
        return self._history.submit(self._read_recent_sends, ids, min(times) - self._longest_cap)

    def _recent_sends(self, ids: list[str], stamps: list, history: Future | None = None) -> dict[str, list[datetime]]:
        """Sends recorded by feedback since the oldest feature timestamp (contacts the features miss)."""
        known = [s for s in stamps if s is not None]
        if not known:
            if history is not None:
                history.cancel()  # no feature time to count from (degraded): the answer needs no history
            return {}
        since = min(known)
        if history is None:
            return self._read_recent_sends(ids, since)
        return {c: [t for t in sends if t >= since] for c, sends in history.result().items()}

    def _read_recent_sends(self, ids: list[str], since: datetime) -> dict[str, list[datetime]]:
        try:
            return self.feedback.recent_sends(ids, since)
        except Exception as exc:  # contact history is a refinement; the answer still goes out
            log.warning("recent sends unavailable: %s", type(exc).__name__)
            return {}

    def record_feedback(self, fb: FeedbackIn) -> RecordResult:
        if not self.ensure_db():
            raise StoreUnavailable(f"the serving database is unavailable: {self._db_error}")
        return self.feedback.record(Feedback(
            exposure_id=fb.exposure_id, customer_id=fb.customer_id, sent=fb.sent, sent_at=fb.sent_at,
            opened=fb.opened, opened_at=fb.opened_at, clicked=fb.clicked, converted=fb.converted,
            revenue=fb.revenue, channel=fb.channel, offer_id=fb.offer_id,
        ))
