"""Shared pieces of the command-line layer: the --home option, error reporting, progress bars."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from engage.config import EngageConfig, config_path, load_config
from engage.settings import ensure_home, resolve_home

# Tables stay readable when output goes to a file or CI log (rich would assume 80 columns there).
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

HomeOption = Annotated[
    Path | None,
    typer.Option(
        "--home",
        envvar="ENGAGE_HOME",
        help="Data folder (default: $ENGAGE_HOME, else data/ in the repo).",
        show_default=False,
    ),
]


def fail(message: str, code: int = 2) -> NoReturn:
    """Print a clear one-line error (no traceback) and exit non-zero."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def home_and_config(home: Path | None) -> tuple[Path, EngageConfig]:
    path = ensure_home(resolve_home(home))
    return path, load_config(config_path(path))


@contextlib.contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[tuple[Progress, int]]:
    """A rich progress bar with one task; yields (progress, task_id)."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    ) as progress:
        yield progress, progress.add_task(description, total=total)
