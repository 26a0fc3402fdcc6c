"""The simulator's ground truth, kept beside the loaded data so models can be measured against it.

``engage ingest`` copies ``ground_truth.parquet`` from a source folder when there is one; real exports
have none, and everything that reads it treats it as optional.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd

TRUTH_FILE = "ground_truth.parquet"


def store_ground_truth(src_dir: Path, home: Path) -> Path | None:
    """Copy ``src_dir/ground_truth.parquet`` into ``home`` (atomically); None when the source has none."""
    src = Path(src_dir) / TRUTH_FILE
    if not src.is_file():
        return None
    dest = home / TRUTH_FILE
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(src, tmp)
        from serving.suppression import drop_suppressed_rows  # the list lives in the serving database

        drop_suppressed_rows(home, tmp)  # a customer forgotten with `engage forget` does not come back
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def load_ground_truth(home: Path) -> pd.DataFrame | None:
    path = home / TRUTH_FILE
    return pd.read_parquet(path) if path.is_file() else None
