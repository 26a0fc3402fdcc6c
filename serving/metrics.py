"""Prometheus metrics of the scoring service.

Importing Feast switches ``prometheus_client`` to its multiprocess mode (Feast sets
``PROMETHEUS_MULTIPROC_DIR``), so metric values live in files shared by every process with that
folder: ``engage serve --workers N`` gives all workers one folder and ``/metrics`` adds them up, so a
scrape sees the whole service whichever worker answers. Within one process, values are shared by
metric name (two app instances in one test process count together; tests compare before and after).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("engage_requests_total", "HTTP requests by endpoint and status",
                                ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram("engage_request_duration_seconds", "request latency by endpoint", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.customers = Counter("engage_customers_scored_total", "customers answered, by source", ["source"],
                                 registry=r)
        self.cold_starts = Counter("engage_cold_starts_total", "answers for customers the store does not know",
                                   registry=r)
        self.degraded = Counter("engage_degraded_answers_total", "answers built from defaults (store unreadable)",
                                registry=r)
        self.stale = Counter("engage_stale_answers_total", "answers with a feature view older than its limit",
                             registry=r)
        self.actions = Counter("engage_actions_total", "decisions by action", ["action"], registry=r)
        self.model_version = Gauge("engage_model_version", "registry version of the loaded champion", ["model"],
                                   registry=r, multiprocess_mode="livemax")
        self.reloads = Counter("engage_model_reloads_total", "model reload attempts by result", ["result"], registry=r)
        self.models_ready = Gauge("engage_models_ready", "1 when models and the feature store are loaded", registry=r,
                                  multiprocess_mode="livemin")
        self.feedback = Counter("engage_feedback_total", "feedback posts by result", ["result"], registry=r)
        self.decision_log_pending = Gauge("engage_decision_log_pending", "decisions waiting to be flushed",
                                          registry=r, multiprocess_mode="livesum")
        self.decision_log_dropped = Gauge("engage_decision_log_dropped", "decisions dropped (buffer overflow)",
                                          registry=r, multiprocess_mode="livesum")
        self.decision_log_errors = Gauge("engage_decision_log_flush_errors", "failed decision log flushes",
                                         registry=r, multiprocess_mode="livesum")
        self.drift_psi = Gauge("engage_drift_psi", "PSI against the champion's training data, per feature and score "
                               "(latest engage monitor run)", ["model", "feature"], registry=r,
                               multiprocess_mode="livemax")
        self.drift_max_psi = Gauge("engage_drift_max_psi", "largest feature PSI per model (latest engage monitor run)",
                                   ["model"], registry=r, multiprocess_mode="livemax")
        self.drift_alerts = Gauge("engage_drift_alerts", "alerts of the latest engage monitor run", ["model"],
                                  registry=r, multiprocess_mode="livemax")
        self.drift_run = Gauge("engage_drift_monitor_timestamp_seconds", "when the latest engage monitor run ran",
                               registry=r, multiprocess_mode="livemax")
        self._drift_seen: float | None = None
        self._collect_hooks: list[Callable[[], None]] = []

    def on_collect(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` before each scrape (to copy live figures into gauges)."""
        self._collect_hooks.append(hook)

    def export_drift(self, home: Path) -> bool:
        """Copy the latest `engage monitor` results (``<home>/monitor/latest.json``) into the drift gauges.

        Re-read only when the file changed; False when there is none or it cannot be read (gauges unchanged).
        """
        path = Path(home) / "monitor" / "latest.json"
        try:
            stamp = path.stat().st_mtime
            if stamp == self._drift_seen:
                return True
            report = json.loads(path.read_text())
            models = report["models"]
            run_at = datetime.fromisoformat(report["run_at"]).timestamp()
        except (OSError, ValueError, KeyError, TypeError):
            return False
        fired = [a["model"] for a in report.get("alerts", []) if a.get("level") == "alert"]
        for m in models:
            for row in [*m.get("features", []), *m.get("scores", [])]:
                value = row.get("psi")
                if isinstance(value, int | float) and math.isfinite(value):
                    self.drift_psi.labels(m["name"], row.get("feature") or row.get("score")).set(value)
            self.drift_max_psi.labels(m["name"]).set(float(m.get("max_feature_psi") or 0.0))
            self.drift_alerts.labels(m["name"]).set(float(fired.count(m["name"])))
        self.drift_run.set(run_at)
        self._drift_seen = stamp
        return True

    def render(self) -> bytes:
        for hook in self._collect_hooks:
            hook()
        folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if folder and os.path.isdir(folder):
            merged = CollectorRegistry()
            MultiProcessCollector(merged, path=folder)
            return generate_latest(merged)
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware: counts and times every HTTP request by its route template."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint, scope.get("method", ""), str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
