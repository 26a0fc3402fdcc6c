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
from datetime import datetime

import duckdb
import pyarrow as pa


def hash_id(*parts: str) -> str:
    """A 32-hex-digit id from ``parts`` (run ids, exposure and decision ids of batch lists)."""
    return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=16).hexdigest()


def exposure_id(id_key: str, customer_id: str) -> str:
    """The exposure id of a listed customer with an action: deterministic, so a re-run gives the same one."""
    return hash_id("exposure", id_key, customer_id)


def decision_id(id_key: str, customer_id: str) -> str:
    return hash_id("decision", id_key, customer_id)


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


def payloads(rows: pa.Table) -> list[str]:
    """The JSON payload of each row of a ranked list, in order."""
    con = duckdb.connect()
    try:
        con.register("listed", rows.select(list(LOG_COLUMNS)))
        return con.sql(PAYLOAD_SQL).to_arrow_table().column("payload").to_pylist()
    finally:
        con.close()


def _repeated_values(column: pa.ChunkedArray | pa.Array) -> list:
    """``column.to_pylist()`` for a column of few distinct values (send times: a few dozen hours), each made
    into a Python object once: a timezone-aware datetime per row cost about 4 s a million."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    encoded = column.dictionary_encode()
    values = encoded.dictionary.to_pylist()
    return [None if i is None else values[i] for i in encoded.indices.to_pylist()]


ENCODED = ("payload",)  # columns decision_columns gives as JSON text (serving.servingdb.bulk_insert's ``encoded``)


def decision_columns(rows: pa.Table, *, id_key: str, run_id: str, as_of: datetime,
                     versions: dict[str, str]) -> dict[str, list]:
    """The decision-log rows of listed rows, column by column (``payload`` as JSON text, see :data:`ENCODED`)."""
    n = rows.num_rows
    data = {c: rows.column(c).to_pylist() for c in ("customer_id", "exposure_id", "action", "action_reason",
                                                     "holdout", "best_offer", "propensity", "channel")}
    data["send_at"] = _repeated_values(rows.column("send_at"))
    held = [bool(h) for h in data["holdout"]]
    model_versions = {k: str(v) for k, v in versions.items()}  # one object: its JSON is made once
    return {
        "decision_id": [decision_id(id_key, c) for c in data["customer_id"]],
        "request_id": [run_id] * n,
        "exposure_id": data["exposure_id"],
        "customer_id": data["customer_id"],
        "decided_at": [as_of] * n,
        "source": ["batch"] * n,
        "action": data["action"],
        "reason": data["action_reason"],
        "chosen_offer": [None if h else o for h, o in zip(held, data["best_offer"], strict=True)],
        "channel": data["channel"],
        "send_at": data["send_at"],
        "propensity": [1.0 if h else (None if p is None or p != p else p)
                       for h, p in zip(held, data["propensity"], strict=True)],
        "cold_start": [False] * n,
        "degraded": [False] * n,
        "holdout": held,
        "feature_timestamp": [as_of] * n,
        "model_versions": [model_versions] * n,
        "payload": payloads(rows),
    }
