"""Where Engage keeps its data: one setting, ``ENGAGE_HOME`` (or ``--home``)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_HOME = REPO_ROOT / "data"
FEATURE_REPO_DIR = REPO_ROOT / "feature_repo"


def resolve_home(home: Path | str | None = None) -> Path:
    """The data folder: ``home`` if given, else ``$ENGAGE_HOME``, else ``data/`` in the repo.

    The path is made absolute so that files recorded in the Feast registry stay valid
    whatever the working directory of a later command.
    """
    chosen = home if home not in (None, "") else os.environ.get("ENGAGE_HOME") or DEFAULT_HOME
    return Path(chosen).expanduser().resolve()


def ensure_home(home: Path) -> Path:
    """Create the data folder if needed; refuse a path that exists and is not a folder."""
    if home.exists() and not home.is_dir():
        raise NotADirectoryError(f"ENGAGE_HOME {home} exists and is not a folder")
    home.mkdir(parents=True, exist_ok=True)
    return home
