"""`engage retrain`: the nightly loop in one command.

1. build the feature snapshot at the as-of time (default: just after the last loaded event), as
   `engage features build` does;
2. apply the Feast definitions and materialize the snapshots into the online store (`engage features apply`,
   `engage features materialize`);
3. train churn, next-best-offer and send-time (`engage train all`: a model without exposures is skipped), each
   gated against its champion by ``registry.log_and_register``;
4. if any ``champion`` alias moved, ask the running scoring service to reload (``POST /v1/admin/reload``), so it
   answers with the new models at once instead of at its next registry check.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from engage.config import EngageConfig
from training.base import MODEL_NAMES, MissingExposures, TrainingError
from training.registry import DEFAULT_EXPERIMENT, Registration

MODULES = {"churn": "training.churn", "nbo": "training.next_best_offer", "send-time": "training.send_time"}
RELOAD_PATH = "/v1/admin/reload"
EXIT_NOT_RELOADED = 4  # `engage retrain --require-reload` when a moved champion could not be pushed to the service


@dataclass
class RetrainResult:
    as_of: datetime
    snapshot_rows: int
    before: dict[str, str]  # champion version per model before training
    after: dict[str, str]
    registrations: list[Registration] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # model -> why

    @property
    def moved(self) -> dict[str, tuple[str | None, str]]:
        """Models whose champion changed: name -> (previous version or None, new version)."""
        return {name: (self.before.get(name), v) for name, v in self.after.items() if self.before.get(name) != v}


def _champions() -> dict[str, str]:
    from serving.models import champion_versions
    from training.registry import connect

    client = connect()
    try:
        return champion_versions(client)
    except Exception as exc:  # registry unreachable or broken: a reason, not a traceback
        raise TrainingError(f"cannot read the model registry: {type(exc).__name__}: {exc}") from exc


def retrain(home: Path, cfg: EngageConfig, as_of: datetime | str | None = None,
            experiment: str = DEFAULT_EXPERIMENT, on_step: Callable[[str], None] | None = None) -> RetrainResult:
    """Features, Feast, train all with the gate; see the module docstring. Raises ``TrainingError``."""
    from features import store as fstore
    from features.snapshots import SnapshotError, build_snapshots, profile_columns
    from training.context import open_context
    from training.registry import log_and_register

    def step(what: str) -> None:
        if on_step:
            on_step(what)

    before = _champions()
    with open_context(home, cfg, as_of) as ctx:  # checks the as-of time against the data
        step(f"building the feature snapshot at {ctx.as_of:%Y-%m-%d %H:%M}Z")
        try:
            built = build_snapshots(ctx.con, home, cfg.features, [ctx.as_of])
        except SnapshotError as exc:
            raise TrainingError(str(exc)) from exc
        step("applying the Feast definitions and materializing the online store")
        try:
            fstore.apply(ctx.store, home, profile_columns(ctx.con), cfg.features.snapshot_ttl_days)
            fstore.materialize(ctx.store, home)
        except fstore.FeatureStoreError as exc:
            raise TrainingError(str(exc)) from exc
        result = RetrainResult(ctx.as_of, built[0].rows, before, {})
        for key, module in MODULES.items():
            step(f"training {key} (Feast, fit, evaluate, gate)")
            try:
                trained = importlib.import_module(module).train(ctx)
            except MissingExposures as exc:
                result.skipped[MODEL_NAMES[key]] = str(exc)
                continue
            result.registrations.append(log_and_register(trained, ctx, experiment))
    if not result.registrations:
        raise TrainingError("no model was trained")
    result.after = _champions()
    return result


def request_reload(url: str, api_key: str | None, timeout_s: float = 60.0) -> tuple[bool, str]:
    """``POST /v1/admin/reload`` on the service at ``url``: (reloaded, what happened in one line)."""
    import httpx

    target = url.rstrip("/") + RELOAD_PATH
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.post(target, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        return False, f"the service at {url} is unreachable ({type(exc).__name__}: {exc})"
    if response.status_code in (401, 403):
        return False, (f"the service at {url} refused the API key (HTTP {response.status_code}): "
                       "pass --api-key or set ENGAGE_API_KEYS")
    if response.status_code != 200:
        return False, f"the service at {url} answered HTTP {response.status_code} to {RELOAD_PATH}"
    body = response.json()
    if body.get("error"):
        return False, f"the service kept its current models: {body['error']}"
    versions = ", ".join(f"{k} v{v}" for k, v in sorted(body.get("versions", {}).items()))
    return True, f"the service at {url} now serves {versions or 'no model'}"


def reload_if_moved(moved: dict[str, tuple[str | None, str]], url: str | None, api_key: str | None,
                    require_reload: bool) -> tuple[list[str], int]:
    """What to tell the service after training: (lines to print, exit code). Reloads only when a champion moved
    and a service URL is configured; a failed reload is a warning, and exit code 4 with ``require_reload``."""
    if not moved:
        return ["no champion moved: nothing to reload"], 0
    lines = [f"moved: {name} champion {'v' + old if old else '(none)'} -> v{new}" for name, (old, new) in moved.items()]
    if not url:
        return [*lines, "no service URL configured (--service-url or ENGAGE_SERVICE_URL): skipping the reload; a "
                        "running service picks the new champion up at its next registry check"], 0
    ok, message = request_reload(url, api_key)
    if ok:
        return [*lines, f"reloaded: {message}"], 0
    return [*lines, f"warning: reload failed: {message}"], EXIT_NOT_RELOADED if require_reload else 0

