"""The `engage` command: mounts each package's CLI."""

from __future__ import annotations

import logging
import os
from typing import Annotated

import typer

from engage import profile
from engage.cli_support import fail
from features.cli import features_app, ingest_command, rejects_command, simulate_command, simulate_respond_command
from features.forget_cli import forget_command
from serving.cli import feedback_app, serve_command
from serving.report_cli import report_command
from serving.score_cli import score_command
from training.cli import models_app, train_command
from training.ops_cli import monitor_command, retrain_command

app = typer.Typer(
    name="engage",
    help="Engage: next-best-action engine (features, training, scoring).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _profile(
    profile_name: Annotated[
        str | None,
        typer.Option("--profile", envvar="ENGAGE_PROFILE", show_default=False,
                     help="embedded (default: SQLite and files under ENGAGE_HOME) or production (Redis and "
                          "PostgreSQL from ENGAGE_REDIS_URL and ENGAGE_POSTGRES_URL)."),
    ] = None,
) -> None:
    """Engage: next-best-action engine (features, training, scoring)."""
    if profile_name:
        os.environ["ENGAGE_PROFILE"] = profile_name  # every module (and `serve`'s workers) reads the environment
    try:
        if profile.is_production():
            profile.production_settings()
    except profile.ProfileError as exc:
        fail(str(exc))


app.command("simulate", help="Simulate a customer base with ground truth into contract files.")(simulate_command)
app.command("ingest", help="Load contract files (customers, events, offers, exposures) into ENGAGE_HOME.")(
    ingest_command
)
app.command("rejects", help="Show rows the last loads rejected, with reasons and original values.")(rejects_command)
app.add_typer(features_app, name="features")
app.command("train", help="Train churn, nbo, send-time or all; log to MLflow, register and gate.")(train_command)
app.add_typer(models_app, name="models")
app.command("score", help="Score every customer with the champion models into a ranked win-back list.")(
    score_command
)
app.command("serve", help="Serve next-best-action recommendations over HTTP (FastAPI + uvicorn).")(serve_command)
app.add_typer(feedback_app, name="feedback")
app.command("monitor", help="Drift of features and scores against the champions' training data (exit 3: alert).")(
    monitor_command
)
app.command("retrain", help="Features, Feast, train all with the gate; reload the service if a champion moved.")(
    retrain_command
)
app.command("simulate-respond", help="Simulate what a batch list's customers do next, from the simulator's truth.")(
    simulate_respond_command
)
app.command("report", help="Realised results against the control group: HTML report, logged to MLflow.")(
    report_command
)
app.command("forget", help="Remove customers from every store and suppress them (right to be forgotten).")(
    forget_command
)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
