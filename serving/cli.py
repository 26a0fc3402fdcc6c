"""`engage serve`: the scoring API under uvicorn, and `engage feedback import`."""

from __future__ import annotations

import os
import secrets
import tempfile
from typing import Annotated

import typer
from pydantic import ValidationError

from engage.cli_support import HomeOption, console, fail

feedback_app = typer.Typer(help="Feedback from engagement systems.", no_args_is_help=True)


def serve_command(
    host: Annotated[str, typer.Option("--host", help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option("--workers", min=1, max=64, help="uvicorn worker processes.")] = 1,
    generate_key: Annotated[bool, typer.Option("--generate-key", help="Print a new API key and exit.")] = False,
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn log level.")] = "info",
    home: HomeOption = None,
) -> None:
    """Serve next-best-action recommendations over HTTP (needs ENGAGE_API_KEYS)."""
    if generate_key:
        console.print(secrets.token_urlsafe(32), highlight=False)
        return
    if log_level not in {"critical", "error", "warning", "info", "debug", "trace"}:
        fail(f"--log-level {log_level!r}: use critical, error, warning, info, debug or trace")
    from serving.settings import ServingSettings

    try:
        settings = ServingSettings.from_env(home)
    except ValidationError as exc:
        fail("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
    if home is not None:
        os.environ["ENGAGE_HOME"] = str(settings.home)  # the workers read settings from the environment
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # one metrics folder for all workers (see serving/metrics.py)
        folder = tempfile.mkdtemp(prefix="engage_metrics_")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.environ["PROMETHEUS_MULTIPROCESS_DIR"] = folder
    _print_example(settings, host, port)
    import uvicorn

    uvicorn.run("serving.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level=log_level, timeout_graceful_shutdown=10)


def _print_example(settings, host: str, port: int) -> None:
    """An example call with a real customer id, so a person can try the service at once."""
    from features.store import FeatureStoreError, sample_customers

    try:
        customer = sample_customers(settings.home, 1)[0]
    except (FeatureStoreError, IndexError, OSError):
        customer = "C0000001"
    body, note = f'"customer_id": "{customer}"', ""
    as_of = _as_of_for_old_features(settings.home)
    if as_of is not None:
        body += f', "now": "{as_of}"'
        note = (f"\n(the store's newest features are older than their age limit today, as with the simulated demo "
                f"world: this example asks as of {as_of}; without `now` answers say stale_features: true)")
    shown = "localhost" if host in ("0.0.0.0", "127.0.0.1", "::") else host
    console.print(f"Engage scoring API on http://{shown}:{port} (OpenAPI docs: http://{shown}:{port}/docs)\n"
                  f"Try:\n  curl -s -X POST http://{shown}:{port}/v1/recommendations "
                  f"-H 'Authorization: Bearer {settings.api_keys[0]}' -H 'Content-Type: application/json' "
                  f"-d '{{{body}}}'{note}", highlight=False, soft_wrap=True)


def _as_of_for_old_features(home) -> str | None:
    """An hour after the latest snapshot when its features are past the shortest age limit now, else None."""
    from datetime import UTC, datetime, timedelta

    from engage.config import ConfigError, config_path, load_config
    from features.store import FeatureStoreError, snapshot_bounds

    try:
        _, last = snapshot_bounds(home)
        limit_days = min(load_config(config_path(home)).feature_max_ages().values())
    except (FeatureStoreError, ConfigError, OSError, ValueError):
        return None
    last = last if last.tzinfo else last.replace(tzinfo=UTC)
    if datetime.now(UTC) - last <= timedelta(days=limit_days):
        return None
    return (last + timedelta(hours=1)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def feedback_import_command(home: HomeOption = None) -> None:
    """Load stored feedback into the warehouse (exposures and events), so training learns from it."""
    from engage.cli_support import home_and_config
    from serving.feedback_import import import_feedback
    from serving.servingdb import create_serving_engine

    home_dir, _ = home_and_config(home)
    try:
        report = import_feedback(home_dir, create_serving_engine(home=home_dir))
    except Exception as exc:  # a clear line, not a traceback
        fail(f"feedback import failed: {type(exc).__name__}: {exc}")
    console.print(report)


feedback_app.command("import")(feedback_import_command)
