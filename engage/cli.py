"""The `engage` command: mounts each package's CLI."""

from __future__ import annotations

import logging
import os
from typing import Annotated

import typer

from engage import profile
from engage.cli_support import fail
from features.cli import features_app, ingest_command, rejects_command, simulate_command
from serving.cli import feedback_app, serve_command
from serving.score_cli import score_command
from training.cli import models_app, train_command

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


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
