"""`engage forget`: remove customers from every store and put them on the suppression list."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from engage.cli_support import HomeOption, console, err_console, fail


def forget_command(
    customer_ids: Annotated[
        list[str] | None, typer.Argument(help="Customer ids to forget.", show_default=False)
    ] = None,
    from_file: Annotated[
        Path | None,
        typer.Option("--from-file", help="A file with one customer id per line (blank lines and '#' lines skipped).",
                     show_default=False),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    allow_unknown: Annotated[
        bool, typer.Option("--allow-unknown", help="Suppress ids that no store knows instead of stopping.")
    ] = False,
    home: HomeOption = None,
) -> None:
    """Remove customers from every store (warehouse, snapshots, online store, serving database, files under
    ENGAGE_HOME) and suppress them: the service answers `none`/`suppressed` and ingest drops them. Safe to repeat."""
    from engage.settings import resolve_home
    from features.forget import ForgetError, clean_ids, forget, read_id_file

    try:
        ids = clean_ids([*(customer_ids or []), *(read_id_file(from_file) if from_file is not None else [])])
    except ForgetError as exc:
        fail(str(exc))
    if not ids:
        fail("no customer ids given: name them as arguments or in a file with --from-file")
    home_dir = resolve_home(home)
    if not home_dir.is_dir():
        fail(f"ENGAGE_HOME {home_dir} does not exist")
    if not yes:
        if not sys.stdin.isatty():
            fail("forgetting cannot be undone: pass --yes to confirm when not running in a terminal")
        typer.confirm(f"Forget {len(ids):,} customer{'s' if len(ids) > 1 else ''} in {home_dir}? "
                      "This cannot be undone", abort=True)
    try:
        report = forget(home_dir, ids, allow_unknown=allow_unknown)
    except (ForgetError, OSError) as exc:  # SuppressionError is an OSError
        fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - a store failed mid-way: say how to finish, not a traceback
        fail(f"forget stopped: {type(exc).__name__}: {exc}. Ids already on the suppression list stay suppressed; "
             "run the same command again to finish (every step is safe to repeat)")

    table = Table("store", "removed", "detail")
    for s in report.stores:
        table.add_row(s.store, f"{s.removed:,}", s.detail)
    console.print(table)
    console.print(f"forgot {report.customers:,} customer{'s' if report.customers > 1 else ''}: "
                  f"{report.removed:,} rows/keys removed; suppression list: {report.newly_suppressed:,} added, "
                  f"{report.already_suppressed:,} already listed"
                  + (f", {report.unknown:,} unknown to every store" if report.unknown else ""))
    if report.leftovers:
        err_console.print("[bold red]still found[/] in files forget does not edit (remove the ids by hand):")
        for path in report.leftovers:
            err_console.print(f"  {path}", highlight=False)
        raise typer.Exit(1)
