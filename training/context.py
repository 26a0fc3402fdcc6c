"""Open a TrainContext for one ENGAGE_HOME."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from engage.config import EngageConfig
from features import store as fstore
from features.load import connect_warehouse, warehouse_path
from features.snapshots import SnapshotError, data_range, default_as_of, to_utc
from features.truth import load_ground_truth
from training.base import TrainContext, TrainingError


@contextlib.contextmanager
def open_context(
    home: Path, cfg: EngageConfig, as_of: datetime | str | None = None, horizon_days: int | None = None
) -> Iterator[TrainContext]:
    """A context over ``home``'s warehouse and feature store, with the data cutoff checked."""
    if not warehouse_path(home).exists():
        raise TrainingError(f"no data loaded in {home}: run `engage ingest DIR` first")
    con = connect_warehouse(home, read_only=True)
    try:
        first_signup, last_event = data_range(con)
        cutoff = default_as_of(con) if as_of is None else to_utc(as_of)
        if cutoff <= first_signup or cutoff > default_as_of(con):
            raise TrainingError(
                f"--as-of {cutoff:%Y-%m-%d %H:%M:%S}Z is outside the data "
                f"({first_signup:%Y-%m-%d} to {last_event:%Y-%m-%d})"
            )
        if horizon_days is not None and horizon_days < 1:
            raise TrainingError("--horizon-days must be at least 1")
        with tempfile.TemporaryDirectory(prefix="engage-train-") as workdir:
            yield TrainContext(
                home=home,
                con=con,
                store=fstore.open_store(home),
                cfg=cfg,
                as_of=cutoff,
                workdir=Path(workdir),
                truth=load_ground_truth(home),
                horizon_days=horizon_days,
            )
    except SnapshotError as exc:
        raise TrainingError(str(exc)) from exc
    finally:
        con.close()
