"""`engage report`: realised results against the control group, as an HTML page and an MLflow run."""

from __future__ import annotations

import contextlib
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from engage.cli_support import HomeOption, console, fail, home_and_config, progress_bar

EXPERIMENT = "engage-report"
STEPS = ("decisions", "feedback", "warehouse", "analysis", "charts", "page", "mlflow")


def default_out(home: Path, when: datetime) -> Path:
    return home / "reports" / f"report-{when:%Y-%m-%d}.html"


def parse_period(since: str | None, until: str | None) -> tuple[datetime | None, datetime | None]:
    """``--since`` / ``--until`` as UTC datetimes (no offset = UTC); since must come before until."""
    from features.snapshots import SnapshotError, to_utc

    try:
        start = to_utc(since) if since else None
        end = to_utc(until) if until else None
    except SnapshotError as exc:
        raise ValueError(str(exc).replace("'", "", 2)) from exc
    if start is not None and end is not None and start >= end:
        raise ValueError(f"--since {start:%Y-%m-%d %H:%M:%S}Z is not before --until {end:%Y-%m-%d %H:%M:%S}Z")
    return start, end


def open_serving_db(home: Path):
    """The serving database, without creating one: a report needs decisions already logged."""
    from sqlalchemy.engine import make_url

    from serving.servingdb import create_serving_engine, serving_db_url

    url = serving_db_url(home)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:") \
            and not Path(parsed.database).exists():
        raise FileNotFoundError(f"no decision log yet ({parsed.database} does not exist): run `engage score` or "
                                "the scoring API first")
    return create_serving_engine(url)


def write_atomic(text: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a report is shared like any file
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def log_to_mlflow(report, html_path: Path, charts: dict[str, Path], experiment: str = EXPERIMENT) -> str:
    """One run in ``experiment``: the period and settings as params, the figures as metrics, HTML and PNGs."""
    import mlflow

    from training.registry import artifact_root, connect

    client = connect()
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(
        experiment, artifact_location=Path(artifact_root()).resolve().as_uri())
    name = f"report {report.since:%Y-%m-%d}" if report.since else "report"
    with mlflow.start_run(experiment_id=exp_id, run_name=f"{name} to {report.until:%Y-%m-%d}") as run:
        mlflow.log_params({"since": report.since.isoformat() if report.since else "", "until": report.until.isoformat(),
                           "attribution_days": report.attribution_days, "margin": report.margin,
                           "churn_window": report.churn_window[:250]})
        mlflow.log_metrics(report.metrics())
        mlflow.set_tags({"profit_verdict": report.difference["profit"].verdict})
        mlflow.log_artifact(str(html_path))
        for png in charts.values():
            mlflow.log_artifact(str(png), artifact_path="charts")
    return run.info.run_id


def report_command(
    since: Annotated[str | None, typer.Option("--since", help="First decision time (ISO 8601, UTC if no offset). "
                                              "Default: the first logged decision.")] = None,
    until: Annotated[str | None, typer.Option("--until", help="Decisions before this time (ISO 8601). Default: "
                                              "all.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="HTML file. Default: $ENGAGE_HOME/reports/"
                                             "report-<date>.html.")] = None,
    attribution_days: Annotated[int, typer.Option("--attribution-days", help="Days after a decision whose "
                                                  "purchases count (>= 1).")] = 7,
    mlflow_log: Annotated[bool, typer.Option("--mlflow/--no-mlflow", help="Log the figures, page and charts to "
                                             f"the MLflow experiment {EXPERIMENT}.")] = True,
    home: HomeOption = None,
) -> None:
    """Realised results of the decisions against the control group: conversion, revenue and profit per customer
    with 95% intervals, churn per tier, offer uplift, send time, KPIs. Writes an HTML page and logs it to MLflow."""
    from engage.config import ConfigError
    from serving import report as rp
    from serving.report_html import draw_charts, render_html

    try:
        start, end = parse_period(since, until)
    except ValueError as exc:
        fail(str(exc))
    if attribution_days < 1:
        fail("--attribution-days must be at least 1")
    try:
        home_dir, cfg = home_and_config(home)
    except (ConfigError, OSError) as exc:
        fail(str(exc))
    now = datetime.now(UTC)
    target = out or default_out(home_dir, now)
    if target.suffix.lower() not in (".html", ".htm"):
        fail(f"--out {target}: use an .html file")
    try:
        engine = open_serving_db(home_dir)
        with progress_bar("report", len(STEPS)) as (bar, task), tempfile.TemporaryDirectory() as tmp:
            def step(name: str) -> None:
                bar.update(task, advance=1, description=f"report: {name}")

            report = rp.build(home_dir, engine, since=start, until=end, attribution_days=attribution_days,
                              margin=cfg.training.margin, horizon_days=cfg.training.horizon_days, on_step=step)
            charts = draw_charts(report, Path(tmp) / "charts")
            step("charts")
            write_atomic(render_html(report, charts, now), target)
            step("page")
            run_id = log_to_mlflow(report, target, charts) if mlflow_log else None
            step("mlflow")
    except rp.ReportError as exc:
        fail(str(exc))
    except FileNotFoundError as exc:
        fail(str(exc))
    except Exception as exc:  # database or MLflow unreachable: one clear line
        fail(f"report failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    print_summary(report, target, run_id)


def print_summary(report, target: Path, run_id: str | None) -> None:
    table = Table("per customer", "treated", "holdout", "treated - holdout [95% interval]", "verdict")
    g = report.groups.set_index("group")
    for key, label, pct in (("conversion", "bought in the window", True), ("revenue", "revenue", False),
                            ("profit", "profit (revenue x margin - offer costs)", False)):
        e = report.difference[key]
        f = (lambda x: f"{x:.2%}") if pct else (lambda x: f"{x:,.2f}")
        table.add_row(label, f(g.loc["treated", key]), f(g.loc["holdout", key]),
                      f"{f(e.value)} [{f(e.low)}, {f(e.high)}]", e.verdict)
    table.add_row("customers", f"{report.counts['treated']:,}", f"{report.counts['holdout']:,}", "", "")
    console.print(table)
    for k in report.kpis.itertuples():
        if k.group == "treated" and k.kpi in ("reach rate", "open rate", "click rate", "conversion rate"):
            console.print(f"{k.kpi}: {k.value:.1%} of {k.n:,}", highlight=False)
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    console.print(f"wrote {target}" + (f"; MLflow run {run_id} in experiment {EXPERIMENT}" if run_id else ""),
                  highlight=False)
