"""`engage score`: score every customer with the champion models and write a ranked win-back list."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from engage.cli_support import HomeOption, console, err_console, fail, home_and_config, progress_bar


def score_command(
    as_of: Annotated[str | None, typer.Option("--as-of", help="Feature time (ISO 8601). Default: just after the "
                                              "last loaded event.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output .parquet or .csv (spark: also a folder for a "
                                             "Parquet directory). Default: $ENGAGE_HOME/scores/winback_as_of=T"
                                             ".parquet. A chart <out>.png is written beside it.")] = None,
    engine: Annotated[str, typer.Option("--engine", help="local (processes on this machine) or spark.")] = "local",
    min_churn: Annotated[float | None, typer.Option("--min-churn", help="Keep customers with churn probability "
                                                    ">= P (0-1).")] = None,
    segment: Annotated[list[str] | None, typer.Option("--segment", help="Keep this RFM segment (repeatable): "
                                                      "high_value, potential, new, at_risk, dormant.")] = None,
    top: Annotated[int | None, typer.Option("--top", help="Keep the first N of the ranked list.")] = None,
    channel: Annotated[str | None, typer.Option("--channel", help="Only this channel: decide on it alone and "
                                                "keep customers reachable on it.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")] = False,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Local engine processes (0 = one per "
                                         "CPU).")] = 0,
    spark_master: Annotated[str | None, typer.Option("--spark-master", envvar="SPARK_MASTER", help="Spark master "
                                                     "URL (default local[*]).")] = None,
    run_id: Annotated[str | None, typer.Option("--run-id", help="Run id (seeds the exploration draws and the "
                                               "exposure ids; default: derived from the as-of time, champions, "
                                               "policy and channel, so a re-run gives the same list and ids).")
                      ] = None,
    log: Annotated[bool, typer.Option("--log/--no-log", help="Append the listed decisions to the decision log "
                                      "(ENGAGE_SERVING_DB_URL), so feedback on the list's exposure ids is "
                                      "accepted.")] = True,
    home: HomeOption = None,
) -> None:
    """Score all customers (features from the offline store, champion models, decision policy) into a
    ranked list: sorted by expected incremental profit of acting (value at risk without an offer model).
    The policy's control group is listed with action none (reason holdout) and ranked by what it would have
    got; the listed decisions go to the decision log once the list is written."""
    from serving.batch import BatchError, BatchOptions
    from serving.batch import plan as make_plan

    if engine not in ("local", "spark"):
        fail(f"unknown engine '{engine}': use local or spark")
    options = BatchOptions(as_of=as_of, out=out, min_churn=min_churn, segments=tuple(segment or ()), top=top,
                           channel=channel, overwrite=overwrite, workers=workers, run_id=run_id, log_decisions=log)
    try:
        home_dir, _ = home_and_config(home)
        with console.status("checking options, data and models ..."):
            plan_ = make_plan(home_dir, options, directory_ok=engine == "spark")
        for note in plan_.notes:
            err_console.print(f"[yellow]note:[/] {note}")
        if engine == "spark":
            from serving.spark_batch import run_spark

            with console.status(f"scoring {plan_.rows:,} customers on Spark ..."):
                summary = run_spark(plan_, master=spark_master)
        else:
            from serving.batch import run_local

            with progress_bar("scoring", plan_.rows) as (progress, task):
                logging = progress.add_task("logging decisions", total=None, visible=False)

                def on_log(n: int) -> None:
                    progress.update(logging, visible=True, advance=n)

                _, summary = run_local(plan_, lambda n: progress.advance(task, n), on_log)
    except BatchError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
    _print_summary(summary)


def _print_summary(s) -> None:
    versions = ", ".join(f"{k} v{v}" for k, v in s.versions.items())
    console.print(f"[bold]{s.scored:,}[/] customers scored as of {s.as_of:%Y-%m-%d %H:%M:%S}Z in {s.seconds:.1f} s "
                  f"({s.rate:,.0f}/s, {s.engine}); models: {versions}")
    if s.stages:
        console.print("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in s.stages.items()), highlight=False)
    table = Table("list", "customers", title=None)
    table.add_row("rows written", f"{s.listed:,}")
    for k, v in s.by_tier.items():
        table.add_row(f"tier {k}", f"{v:,}")
    for k, v in s.by_segment.items():
        table.add_row(f"segment {k}", f"{v:,}")
    for k, v in s.by_action.items():
        table.add_row(f"action {k}", f"{v:,}")
    table.add_row("control group (holdout: action none)", f"{s.holdout:,}")
    console.print(table)
    console.print(f"total value at risk: {s.value_at_risk:,.2f}")
    if s.expected_profit is not None:
        console.print(f"expected incremental profit of the list: {s.expected_profit:,.2f}")
    console.print(f"wrote {s.out}" + (f" and {s.chart}" if s.chart else ""))
    if s.logged is not None:
        console.print(f"decision log: {s.logged:,} decisions (source batch) in {s.decision_log}", highlight=False)
