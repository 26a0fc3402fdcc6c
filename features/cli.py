"""Commands of the features package: simulate, ingest, and `engage features build|apply|materialize|show`.

Each command parses its options and calls a plain function; heavy imports (Feast, DuckDB) happen
inside the commands so that ``--help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from engage.cli_support import HomeOption, console, fail, home_and_config, progress_bar
from engage.config import ConfigError

features_app = typer.Typer(
    help="Build behavioural feature snapshots and serve them through Feast.", no_args_is_help=True
)


def simulate_command(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the contract files and ground truth into.")],
    customers: Annotated[int, typer.Option("--customers", min=1, help="Number of customers.")] = 10_000,
    days: Annotated[int, typer.Option("--days", min=1, help="Days of history to simulate.")] = 365,
    seed: Annotated[int, typer.Option("--seed", help="Random seed; the same seed gives the same data.")] = 7,
    fmt: Annotated[str, typer.Option("--format", help="File format: parquet or csv.")] = "parquet",
    start: Annotated[
        str | None, typer.Option("--start", help="First simulated day (ISO 8601, default 2025-01-01).")
    ] = None,
    shift_at: Annotated[
        str | None, typer.Option("--shift-at", help="Date from which everyone's behaviour changes (with --shift).")
    ] = None,
    shift: Annotated[
        str | None, typer.Option("--shift", help="The change from --shift-at on: purchases (organic purchase rates "
                                 "halve) or engagement (sessions, purchases and conversions halve).")
    ] = None,
) -> None:
    """Simulate a customer base with latent traits; writes the four contract tables plus ground truth."""
    from features.simulate import DEFAULT_START, simulate

    try:
        result = simulate(customers, days, seed, out, start=start or DEFAULT_START, fmt=fmt, progress=True,
                          shift_at=shift_at, shift=shift)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    console.print(
        f"simulated {result.n_customers:,} customers, {result.n_events:,} events, "
        f"{result.n_exposures:,} exposures in {result.seconds:.1f}s -> {result.out_dir}"
    )


def ingest_command(
    src: Annotated[Path, typer.Argument(help="Folder with customers, events[, offers, exposures] as CSV or Parquet.")],
    home: HomeOption = None,
) -> None:
    """Load contract files into ENGAGE_HOME; bad rows go to the rejects table, the good rows load."""
    from features.load import ContractError, ingest
    from features.truth import store_ground_truth

    try:
        home_dir, _ = home_and_config(home)
        with console.status(f"loading {src} ..."):
            report = ingest(src, home_dir)
            truth = store_ground_truth(src, home_dir)
    except (ContractError, ConfigError, OSError) as exc:
        fail(str(exc))
    console.print(report.format_table())
    if truth:
        console.print(f"kept the simulator's ground truth: {truth}")


def _warehouse(home_dir: Path):
    """A read-only connection to the loaded data, or a clear error when nothing is loaded yet."""
    from features.load import connect_warehouse, warehouse_path

    if not warehouse_path(home_dir).exists():
        fail(f"no data loaded in {home_dir}: run `engage ingest DIR` first")
    return connect_warehouse(home_dir, read_only=True)


@features_app.command("build")
def build_command(
    as_of: Annotated[
        list[str] | None,
        typer.Option("--as-of", help="Snapshot time (ISO 8601, UTC if no offset); repeatable. "
                     "Default: just after the last loaded event."),
    ] = None,
    home: HomeOption = None,
) -> None:
    """Compute point-in-time feature snapshots with DuckDB (rows strictly before each time)."""
    from features.snapshots import SnapshotError, build_snapshots, to_utc

    try:
        home_dir, cfg = home_and_config(home)
        times = [to_utc(t) for t in as_of] if as_of else None
        con = _warehouse(home_dir)
        with progress_bar("building snapshots", len(times) if times else 1) as (bar, task):
            results = build_snapshots(con, home_dir, cfg.features, times, on_done=lambda _: bar.advance(task))
    except (SnapshotError, ConfigError, OSError) as exc:
        fail(str(exc))
    for r in results:
        console.print(f"snapshot {r.as_of:%Y-%m-%dT%H:%M:%SZ}: {r.rows:,} customers in {r.seconds:.1f}s -> {r.path}")


@features_app.command("apply")
def apply_command(home: HomeOption = None) -> None:
    """Register the customer entity, feature views and feature services in Feast."""
    from features import store as fstore
    from features.snapshots import profile_columns

    try:
        home_dir, cfg = home_and_config(home)
        con = _warehouse(home_dir)
        names = fstore.apply(
            fstore.open_store(home_dir), home_dir, profile_columns(con), cfg.features.snapshot_ttl_days
        )
    except (ConfigError, OSError, fstore.FeatureStoreError) as exc:
        fail(str(exc))
    console.print(f"applied {len(names)} Feast objects: {', '.join(names)}")


@features_app.command("render")
def render_command(home: HomeOption = None) -> None:
    """Print the feature_store.yaml of the active profile (for the plain `feast` CLI: save it in a folder)."""
    from engage.settings import resolve_home
    from features import store as fstore

    console.print(fstore.render_feature_store_yaml(resolve_home(home)), highlight=False, markup=False)


@features_app.command("materialize")
def materialize_command(home: HomeOption = None) -> None:
    """Load the latest snapshot of every customer into the online store."""
    from features import store as fstore

    try:
        home_dir, _ = home_and_config(home)
        store = fstore.open_store(home_dir)
        with progress_bar("materializing customers", None) as (bar, task):
            def shown(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            start, end = fstore.materialize(store, home_dir, on_progress=shown)
    except (ConfigError, OSError, fstore.FeatureStoreError) as exc:
        fail(str(exc))
    console.print(f"materialized snapshots from {start:%Y-%m-%d %H:%M:%S} to {end:%Y-%m-%d %H:%M:%S} UTC")


@features_app.command("show")
def show_command(
    customer_ids: Annotated[
        list[str] | None, typer.Argument(help="Customer ids to read from the online store.", show_default=False)
    ] = None,
    sample: Annotated[
        int,
        typer.Option("--sample", min=0, max=100, help="Without ids: show this many customers of the latest snapshot."),
    ] = 2,
    service: Annotated[
        str, typer.Option("--service", help="Feature service: churn, next_best_offer or send_time.")
    ] = "churn",
    home: HomeOption = None,
) -> None:
    """Print online feature values of some customers, as the scoring service reads them."""
    from feast.errors import FeatureServiceNotFoundException

    from features import store as fstore

    try:
        home_dir, _ = home_and_config(home)
        ids = list(customer_ids or []) or fstore.sample_customers(home_dir, sample)
        if not ids:
            fail("no customer ids given and --sample is 0")
        df = fstore.online_features(fstore.open_store(home_dir), service, ids)
    except FeatureServiceNotFoundException:
        fail(f"feature service '{service}' is not registered: run `engage features apply` (services: "
             "churn, next_best_offer, send_time)")
    except (ConfigError, OSError, fstore.FeatureStoreError) as exc:
        fail(str(exc))
    console.print(f"online features ({service}) for {', '.join(ids)}:")
    console.print(df.set_index("customer_id").T.to_string(), highlight=False)


def rejects_command(
    table: Annotated[
        str | None, typer.Option("--table", help="Only rows of this table (customers, events, ...).")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10_000, help="Rows to show.")] = 20,
    home: HomeOption = None,
) -> None:
    """Show rejected rows with their reason and original values, newest first."""
    home_dir, _ = home_and_config(home)
    con = _warehouse(home_dir)
    where, params = ("WHERE table_name = ?", [table]) if table else ("", [])
    counts = con.execute(f"SELECT table_name, count(*) FROM rejects {where} GROUP BY 1 ORDER BY 1", params).fetchall()
    if not counts:
        console.print("no rejected rows" + (f" for table {table}" if table else ""))
        return
    console.print("rejected rows: " + ", ".join(f"{t} {n:,}" for t, n in counts))
    df = con.execute(
        f"SELECT table_name, source_file, row_number, reason, original FROM rejects {where} "
        "ORDER BY rejected_at DESC, table_name, row_number LIMIT ?",
        [*params, limit],
    ).df()
    console.print(df.to_string(index=False, max_colwidth=80), highlight=False)


def simulate_respond_command(
    list_path: Annotated[Path, typer.Option("--list", help="A batch list written by `engage score` (.parquet/.csv).")],
    truth: Annotated[Path, typer.Option("--truth", help="The simulated world the list was scored on: the folder "
                                        "`engage simulate` wrote (or an ENGAGE_HOME holding its ground truth).")],
    days: Annotated[int, typer.Option("--days", help="Days after the list's as-of time to simulate (>= 1).")] = 7,
    seed: Annotated[int, typer.Option("--seed", help="Random seed; the same seed gives the same responses.")] = 0,
    effect: Annotated[str, typer.Option("--effect", help="real: messages and offers work as the truth says; none: "
                                        "they change nothing (no conversions from messages).")] = "real",
    send_at_recommended: Annotated[float, typer.Option("--send-at-recommended", help="Share of messages sent at the "
                                                       "recommended time (0-1); the rest go out at another daytime "
                                                       "hour.")] = 0.8,
    out: Annotated[Path | None, typer.Option("--out", help="Folder for the contract files. Default: "
                                             "<list>.responses beside the list.")] = None,
    feedback: Annotated[bool, typer.Option("--feedback/--no-feedback", help="Post one feedback per message to the "
                                           "serving database (ENGAGE_SERVING_DB_URL).")] = True,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")] = False,
    home: HomeOption = None,
) -> None:
    """Simulate what the customers of a batch list do over the next days, from the simulator's ground truth:
    contract files for `engage ingest` and feedback for the decision log (see features/respond.py)."""
    from features.respond import RespondError, respond
    from serving.feedback import FeedbackError

    try:
        home_dir, _ = home_and_config(home)
        engine = None
        if feedback:
            from serving.servingdb import create_serving_engine

            engine = create_serving_engine(home=home_dir)
        with console.status("simulating responses ..."):
            result = respond(list_path, truth, out=out, days=days, seed=seed, effect=effect,
                             send_at_recommended=send_at_recommended, engine=engine, overwrite=overwrite, post=False)
        if engine is not None:
            from features.respond import post_feedback

            with progress_bar("posting feedback", len(result.responses.exposures)) as (bar, task):
                result.feedback_posted = post_feedback(result.responses.exposures, engine,
                                                       lambda n: bar.advance(task, n))
    except (RespondError, FeedbackError, ConfigError, OSError) as exc:
        fail(str(exc))
    r = result.responses
    x = r.exposures
    console.print(f"{r.listed:,} listed customers, {r.treated:,} with a message, {r.holdout:,} in the control "
                  f"group; {r.as_of:%Y-%m-%d %H:%M}Z to {r.end:%Y-%m-%d %H:%M}Z (effect {effect})")
    console.print(f"messages sent {len(x):,}, opened {int(x['opened_at'].notna().sum()):,}, clicked "
                  f"{int(x['clicked'].sum()):,}, converted {int(x['converted'].sum()):,} (revenue "
                  f"{x['revenue'].sum():,.2f}); organic orders {r.organic_orders:,}")
    if result.feedback_posted is not None:
        console.print(f"posted {result.feedback_posted:,} feedback rows")
    console.print(f"wrote {result.out_dir}: load it with `engage ingest {result.out_dir}`", highlight=False)
