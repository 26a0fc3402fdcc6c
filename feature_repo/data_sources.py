from pathlib import Path

from feast import FileSource
from feast.data_format import ParquetFormat

from features.snapshots import CREATED_FIELD, TIMESTAMP_FIELD, snapshot_glob


def customer_snapshot_source(home: Path) -> FileSource:
    """All point-in-time snapshots under ENGAGE_HOME: one Parquet file per snapshot time."""
    return FileSource(
        name="customer_snapshot_source",
        path=snapshot_glob(home),
        file_format=ParquetFormat(),
        timestamp_field=TIMESTAMP_FIELD,
        created_timestamp_column=CREATED_FIELD,
        description="Customer feature snapshots computed by `engage features build` (DuckDB).",
    )
