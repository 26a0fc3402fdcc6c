"""`engage monitor` and `engage retrain`: the commands a scheduler runs every night.

Exit codes: 0 done (monitor: no alert, warnings allowed); 2 bad input or a failure (nothing half-written);
3 `engage monitor` raised at least one alert; 4 `engage retrain --require-reload` could not make the service
reload a moved champion.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from engage.cli_support import HomeOption, console, err_console, fail, home_and_config, progress_bar
from engage.config import ConfigError
from training.base import TrainingError


def monitor_command(
    as_of: Annotated[str | None, typer.Option("--as-of", help="Time to monitor (ISO 8601). Default: just after the "
                                              "last loaded event.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="HTML report path (the JSON is written beside it). "
                                             "Default: $ENGAGE_HOME/monitor/monitor_<as-of>.html.")] = None,
    home: HomeOption = None,
) -> None:
    """Drift of features and scores against each champion's training data; exit code 3 when an alert fires."""
    from training.monitor import EXIT_ALERT, MonitorError, run_monitor
    from training.monitor_report import alert_table, check_out, model_table, write_report

    try:
        home_dir, cfg = home_and_config(home)
        check_out(out)
        with progress_bar("monitoring", None) as (bar, task):
            result = run_monitor(home_dir, cfg, as_of, on_step=lambda what, done, total: bar.update(
                task, description=what, completed=done, total=total))
        files = write_report(result, home_dir, cfg.monitor.psi_warn, cfg.monitor.psi_alert, out)
    except (MonitorError, ConfigError, TrainingError, ValueError, OSError) as exc:
        fail(str(exc))
    console.print(model_table(result))
    if result.alerts:
        console.print(alert_table(result))
    for note in result.notes:
        console.print(f"[dim]note:[/] {note}")
    console.print(f"report {files.html}, JSON {files.json}; MLflow run {files.run_id} (experiment engage-monitor)")
    if result.fired:
        err_console.print(f"[bold red]{len(result.fired)} drift alert(s)[/] (exit code {EXIT_ALERT})")
        raise typer.Exit(EXIT_ALERT)
    console.print("[green]no drift alert[/]")


def retrain_command(
    as_of: Annotated[str | None, typer.Option("--as-of", help="Data cutoff (ISO 8601). Default: just after the last "
                                              "loaded event.")] = None,
    service_url: Annotated[str | None, typer.Option("--service-url", envvar="ENGAGE_SERVICE_URL", help="Scoring "
                                                    "service to reload when a champion moves, e.g. "
                                                    "http://127.0.0.1:8000.", show_default=False)] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", help="Bearer key for the reload (default: the first "
                                                "of ENGAGE_API_KEYS).", show_default=False)] = None,
    require_reload: Annotated[bool, typer.Option("--require-reload", help="Exit 4 when a moved champion could not "
                                                 "be pushed to the service.")] = False,
    experiment: Annotated[str, typer.Option("--experiment", help="MLflow experiment name.")] = "engage",
    home: HomeOption = None,
) -> None:
    """Build features, apply and materialize Feast, train all with the gate, reload the service if a champion moved."""
    from training.retrain import reload_if_moved, retrain

    try:
        home_dir, cfg = home_and_config(home)
        with progress_bar("retraining", 5) as (bar, task):  # snapshot, Feast, three models
            started = []

            def step(what: str) -> None:
                bar.update(task, description=what, completed=len(started))
                started.append(what)

            result = retrain(home_dir, cfg, as_of, experiment, on_step=step)
            bar.update(task, description="done", completed=5)
    except (TrainingError, ConfigError, OSError) as exc:
        fail(str(exc))
    console.print(f"snapshot at {result.as_of:%Y-%m-%d %H:%M:%S}Z: {result.snapshot_rows:,} customers")
    for name, why in result.skipped.items():
        err_console.print(f"[yellow]skipped {name}:[/] {why}")
    for reg in result.registrations:
        console.print(f"[bold]{reg.model_name}[/] version {reg.version} -> [bold]{reg.alias}[/]: {reg.reason}")
    key = api_key or next((k.strip() for k in os.environ.get("ENGAGE_API_KEYS", "").split(",") if k.strip()), None)
    lines, code = reload_if_moved(result.moved, service_url, key, require_reload)
    for line in lines:
        (err_console if line.startswith("warning") else console).print(line, highlight=False, soft_wrap=True)
    if code:
        raise typer.Exit(code)
