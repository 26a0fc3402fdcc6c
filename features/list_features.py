"""List features (one Feast field holding a vector, e.g. 24 hourly counts) spread into model columns.

Feast stores and serves ``email_sent_by_hour`` as one value; the models read its 24 positions as the
columns ``email_sent_hour_00`` ... ``email_sent_hour_23`` (``features.catalog.LIST_FEATURES``). One list
field instead of 24 scalar fields keeps a customer's online hash small: about 120 fields instead of 400, which
is what lets Redis hold a million customers (see BENCHMARKS.md). Values arrive in three shapes, all handled
here: a pandas column of lists or arrays (Feast's historical retrieval, Spark), a Python list of lists (the
online read), an Arrow list array (batch scoring reads the snapshot file). A missing list (a customer with
no row) is NaN in every element column.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from features.catalog import INT_LISTS, LIST_FEATURES


class ListFeatureError(ValueError):
    """A list feature's value does not have the length the catalog gives it."""


def list_matrix(name: str, values: Sequence | np.ndarray | pa.Array | pa.ChunkedArray | pd.Series) -> np.ndarray:
    """The values of list feature ``name`` as an (n, width) float array; a missing value is a row of NaN."""
    width = len(LIST_FEATURES[name])
    if isinstance(values, np.ndarray) and values.ndim == 2:
        if values.shape[1] != width:
            raise ListFeatureError(f"{name}: {values.shape[1]} values per row, expected {width}")
        return values.astype(np.float64, copy=False)
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        return _arrow_matrix(name, values, width)
    if isinstance(values, pd.Series):
        values = values.tolist()
    out = np.full((len(values), width), np.nan)
    present = [i for i, v in enumerate(values) if v is not None and not (isinstance(v, float) and v != v)]
    if present:
        rows = [values[i] for i in present]
        bad = next((r for r in rows if len(r) != width), None)
        if bad is not None:
            raise ListFeatureError(f"{name}: a value of length {len(bad)}, expected {width}")
        out[present] = np.asarray(rows, dtype=np.float64)
    return out


def _arrow_matrix(name: str, arr: pa.Array, width: int) -> np.ndarray:
    out = np.full((len(arr), width), np.nan)
    if len(arr) == 0:
        return out
    lengths = arr.value_lengths().fill_null(width).to_numpy(zero_copy_only=False)
    if (lengths != width).any():
        raise ListFeatureError(f"{name}: a value of length {int(lengths[lengths != width][0])}, expected {width}")
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    flat = arr.filter(arr.is_valid()).flatten().to_numpy(zero_copy_only=False).astype(np.float64)
    out[valid] = flat.reshape(-1, width)
    return out


def expand_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with each list feature column replaced by its element columns, in place of it.

    Element columns are int64 when the feature is an integer list with no missing row, else float64.
    A frame without list columns is returned as it is.
    """
    names = [c for c in frame.columns if c in LIST_FEATURES]
    if not names:
        return frame
    parts: dict[str, pd.Series | pd.DataFrame] = {}
    for col in frame.columns:
        if col not in LIST_FEATURES:
            parts[col] = frame[col]
            continue
        m = list_matrix(col, frame[col])
        if col in INT_LISTS and not np.isnan(m).any():
            m = m.astype(np.int64)
        parts[col] = pd.DataFrame(m, index=frame.index, columns=list(LIST_FEATURES[col]))
    return pd.concat([p.to_frame() if isinstance(p, pd.Series) else p for p in parts.values()], axis=1)

