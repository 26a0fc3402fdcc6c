"""The decision-log rows of a batch list (table ``decisions``), built column by column from the list itself.

Both engines log exactly what they wrote: ``decided_at`` and the feature timestamp are the as-of time,
``request_id`` the run id, ``source`` ``batch``. The payload holds the churn facts, the chosen offer (control
group: the intended one, also in ``intended_offer``) with its predicted uplift, the rule behind ``none`` and
the rank, in the shape :func:`serving.decision_log.decision_record` gives API answers. A control-group record
has no ``chosen_offer``: nothing was offered.

The payloads are written as JSON text by DuckDB over the list's Arrow columns (``to_json`` of a struct per
row): a million rows take about a second, where a dict per row and ``json.dumps`` took about forty.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from functools import lru_cache

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from serving.servingdb import decisions


def hash_id(*parts: str) -> str:
    """A 32-hex-digit id from ``parts`` (run ids; exposure and decision ids of long customer ids)."""
    return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=16).hexdigest()


RUN_PREFIX_HEX = 16  # hex digits of the run's hash before a customer id (64 bits: runs do not collide)
DECISION_ID_CHARS = decisions.c.decision_id.type.length
EXPOSURE_ID_CHARS = decisions.c.exposure_id.type.length


@lru_cache(maxsize=64)
def run_prefix(kind: str, id_key: str) -> str:
    """What a run's ids of one kind (``decision``, ``exposure``) start with, ``-`` included."""
    return hash_id(kind, id_key)[:RUN_PREFIX_HEX] + "-"


def _batch_id(kind: str, id_key: str, customer_id: str, limit: int) -> str:
    """``<run prefix>-<customer id>``; a hash of both when that is longer than ``limit`` (a hash has no ``-``).

    Deterministic (a re-run gives the same ids) and, within a run, in customer-id order: the decision log's
    indexes take a run's rows, sorted by customer, as appends instead of inserts at random pages (a million
    rows logged in about half the time of random hashes).
    """
    prefix = run_prefix(kind, id_key)
    if len(customer_id) <= _room(prefix, limit):
        return prefix + customer_id
    return hash_id(kind, id_key, customer_id)


def _room(prefix: str, limit: int) -> int:
    """The longest customer id that fits behind ``prefix`` in a column of ``limit`` characters."""
    return limit - len(prefix)


def exposure_id(id_key: str, customer_id: str) -> str:
    """The exposure id of a listed customer with an action: deterministic, so a re-run gives the same one."""
    return _batch_id("exposure", id_key, customer_id, EXPOSURE_ID_CHARS)


def decision_id(id_key: str, customer_id: str) -> str:
    return _batch_id("decision", id_key, customer_id, DECISION_ID_CHARS)


def decision_ids(id_key: str, customer_ids: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """:func:`decision_id` of each customer id, in Arrow when every id is short enough."""
    prefix = run_prefix("decision", id_key)
    if pc.all(pc.less_equal(pc.utf8_length(customer_ids), _room(prefix, DECISION_ID_CHARS))).as_py() is not False:
        return pc.binary_join_element_wise(pa.scalar(prefix), customer_ids, "")
    return pa.array([decision_id(id_key, c) for c in customer_ids.to_pylist()], pa.string())


# The list's columns a decision-log row is made of.
LOG_COLUMNS = ("customer_id", "exposure_id", "churn_probability", "risk_tier", "segment", "expected_value",
               "value_at_risk", "reason_codes", "action", "action_reason", "holdout", "intended_action",
               "best_offer", "offer_uplift", "expected_incremental_profit", "propensity", "channel",
               "expected_open_rate", "send_at", "send_at_local", "rank")


def _num(column: str) -> str:
    """A float column with NaN and infinities as null (JSON has neither)."""
    return f"CASE WHEN isfinite({column}) THEN {column} END"


PAYLOAD_SQL = f"""
SELECT to_json({{
    'churn_probability': {_num('churn_probability')},
    'risk_tier': risk_tier,
    'segment': segment,
    'reasons': CASE WHEN coalesce(reason_codes, '') = '' THEN []::VARCHAR[]
                    ELSE list_filter(string_split(reason_codes, ';'), lambda c: c <> '') END,
    'offers': CASE WHEN best_offer IS NULL THEN []
                   ELSE [{{'offer_id': best_offer, 'uplift': {_num('offer_uplift')},
                          'expected_incremental_profit': {_num('expected_incremental_profit')},
                          'chosen': NOT coalesce(holdout, false)}}] END,
    'channels': []::VARCHAR[],
    'suppressions': CASE WHEN action_reason IS NULL THEN []
                         ELSE [{{'rule': action_reason, 'target': 'action', 'detail': action_reason}}] END,
    'send_at_local': send_at_local,
    'expected_open_rate': {_num('expected_open_rate')},
    'expected_value_at_risk': {_num('value_at_risk')},
    'expected_value': {_num('expected_value')},
    'intended_action': intended_action,
    'intended_offer': CASE WHEN coalesce(holdout, false) THEN best_offer END,
    'rank': "rank"
}})::VARCHAR AS payload
FROM listed
"""


def payloads(rows: pa.Table) -> pa.ChunkedArray:
    """The JSON payload of each row of a ranked list, in order."""
    con = duckdb.connect()
    try:
        con.register("listed", rows.select(list(LOG_COLUMNS)))
        return con.sql(PAYLOAD_SQL).to_arrow_table().column("payload")
    finally:
        con.close()


ENCODED = ("model_versions", "payload")  # JSON columns decision_table gives as JSON text (bulk_insert's ``encoded``)

_UTC = pa.timestamp("us", tz="UTC")


def decision_table(rows: pa.Table, *, id_key: str, run_id: str, as_of: datetime,
                   versions: dict[str, str]) -> pa.Table:
    """The decision-log rows of listed rows: an Arrow table with the columns of table ``decisions`` (its JSON
    columns as JSON text, see :data:`ENCODED`), built column by column without a Python object per value."""
    n = rows.num_rows
    held = pc.fill_null(rows.column("holdout"), False)
    propensity = rows.column("propensity")
    propensity = pc.if_else(pc.fill_null(pc.is_nan(propensity), True), pa.scalar(None, pa.float64()), propensity)
    model_versions = json.dumps({k: str(v) for k, v in versions.items()})

    def repeat(value, kind: pa.DataType) -> pa.Array:
        return pa.repeat(pa.scalar(value, kind), n)

    return pa.table({
        "decision_id": decision_ids(id_key, rows.column("customer_id")),
        "request_id": repeat(run_id, pa.string()),
        "exposure_id": rows.column("exposure_id"),
        "customer_id": rows.column("customer_id"),
        "decided_at": repeat(as_of, _UTC),
        "source": repeat("batch", pa.string()),
        "action": rows.column("action"),
        "reason": rows.column("action_reason"),
        "chosen_offer": pc.if_else(held, pa.scalar(None, pa.string()), rows.column("best_offer")),
        "channel": rows.column("channel"),
        "send_at": rows.column("send_at").cast(_UTC),
        "propensity": pc.if_else(held, 1.0, propensity),
        "cold_start": repeat(False, pa.bool_()),
        "degraded": repeat(False, pa.bool_()),
        "holdout": held,
        "feature_timestamp": repeat(as_of, _UTC),
        "model_versions": repeat(model_versions, pa.string()),
        "payload": payloads(rows),
    })
