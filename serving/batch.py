"""Batch scoring: every customer at one as-of time -> a ranked win-back list (`engage score`).

Steps (the local engine; ``serving/spark_batch.py`` runs the same chunk step on Apache Spark):

1. **Plan** (:func:`plan`): check the options, the as-of time against the loaded data (as training does),
   the output path (refuse an existing file unless ``overwrite``; the folder must be writable), load the
   champion models from the MLflow registry (``serving.models``) and the decision policy.
2. **Features** from the offline store, in bulk: the point-in-time snapshot at the as-of time, built when
   missing. That Parquet file *is* the Feast offline source (the ``FileSource`` over
   ``feature_data/customer_snapshots/as_of=...parquet``), so reading it with pyarrow returns exactly the
   rows Feast's ``get_historical_features`` returns for every customer at T (its point-in-time join picks,
   per customer, the latest row at or before T, which at T is this file's row) -- without a join of
   1,000,000 entity rows against every snapshot file, which is far slower. ``tests/test_batch_score.py``
   checks the two agree. Only the columns the loaded models and the policy read are loaded.
3. **Score and decide** (:func:`score_chunk`), chunk by chunk (``chunk_size`` rows, over ``workers``
   processes): ``Scorer.score`` (the models, vectorized over the chunk) then ``decide`` per customer with
   ``now`` = the as-of time and ``request_id`` = the run id (exploration is reproducible): the same two
   functions the scoring API calls, so a customer gets the same tier, offer, channel and send time from
   either. Filters that are per customer run here: ``segments`` before scoring, ``min_churn`` before
   deciding, ``channel`` as the only candidate channel (and only customers reachable on it are kept).
   Every row with an action gets an ``exposure_id``: the customer id behind a 16-hex-digit hash of the as-of
   time, the champion versions and the run id (``<hash>-<customer id>``; a 32-hex-digit hash of all of them
   when that is too long), the run id's default being itself a hash of the as-of time, the champion
   versions, the policy and ``channel``. A re-run of the same nightly job therefore writes the same list
   with the same ids, and feedback for the first run's messages still finds its decision.
   Reason codes (SHAP values, ``training/treeshap.py``) are computed here too when every scored row is
   written (no ``top``, ``min_churn`` or ``channel``); otherwise a second pass after ranking computes them for
   the listed rows only (:func:`add_reasons`).
4. **Rank** (:func:`rank`): customers with an action first, then by expected incremental profit of the
   chosen offer, then by value at risk (the order when there is no offer model), then customer id;
   ``top`` keeps the first N. Without filters every customer is written (the full scoring table).
5. **Write** atomically (:func:`write_atomic`: a temporary file in the same folder, then a rename), so a
   failed run never leaves a partial list; a PNG chart beside it (``<out stem>.png``: churn probability
   distribution and the cumulative expected profit of the list); a :class:`BatchSummary`.
6. **Log** the listed rows' decisions to the decision log (:func:`log_decisions`: table ``decisions`` of
   the serving database, ``source`` = ``batch``, ``decided_at`` = the as-of time), only once the list file
   is in place, in one transaction (all of the list's decisions or none; rows built by
   ``serving/batch_log.py``) and in customer order. Decision ids are made like the exposure ids, so the log's
   indexes take a run's rows in order; the insert skips ids already there, so a re-run logs nothing twice,
   and a run whose logging failed is repaired by running it again.

**The control group.** Customers in the policy's holdout (``holdout.share``, a salted hash of the customer
id, see ``serving/policy.py``) get the API's answer for them: ``action`` none, ``action_reason`` holdout,
no channel, send time or exposure id, so the campaign tool sends them nothing. Their ``intended_action``
and the offer columns say what they would have got, and ranking treats them as if they had that action:
a holdout row sits where its intended expected profit puts it. A ``--top N`` list (or any filter) thus
keeps the control group's share and composition equal to the treated group's -- the same tiers, segments
and offers in the same proportions -- which is what lets `engage report` compare the two groups' outcomes
(intention to treat). Ranking the control group last, or leaving it out of short lists, would compare the
list's best customers with everybody else.

Output columns (:data:`OUTPUT_SCHEMA`, one row per selected customer, in rank order):

=============================  ==========================================================================
``rank``                       1 = act first
``customer_id``
``churn_probability``          calibrated P(churn) over the churn horizon
``risk_tier``                  high / medium / low (policy thresholds)
``segment``                    RFM segment at the as-of time
``expected_value``             expected revenue over the horizon (buy-till-you-die rate x P(alive) x value)
``value_at_risk``              churn_probability x expected_value
``reason_codes``               churn reason codes (features pushing risk up), ``;``-separated
``exposure_id``                the message's id for feedback (``POST /v1/feedback``); empty without an action
``action``                     winback / retain / upsell / nurture / none
``action_reason``              why ``none`` (consent, quiet_hours, recent_complaint, contact_cap, holdout, ...)
``holdout``                    in the control group: action none, nothing is sent
``intended_action``            control group only: the action the policy would have taken (``none`` when a
                               rule stopped it as well); empty for everybody else
``best_offer``                 the chosen offer id; empty = a message without an offer (control group: the
                               offer they would have got)
``offer_uplift``               P(convert | offer) - P(convert | no offer) of the chosen offer
``expected_incremental_profit``  of acting: the chosen offer's expected incremental profit, 0 for a
                               message without an offer, empty when there is no action or no offer model
                               (control group: of the intended action)
``propensity``                 probability the policy chose this offer (epsilon exploration)
``channel``                    channel to send on
``expected_open_rate``         P(open within 24 h) at the chosen hour (empty without a send-time model)
``send_at``                    UTC timestamp to send (empty without a send-time model)
``send_at_local``              the same moment in the customer's timezone, ISO 8601 with offset
``timezone``                   the customer's IANA timezone
``churn_model_version``, ``nbo_model_version``, ``send_time_model_version``  registry versions used
``note``                       what is missing (no next-best-offer / send-time champion), else empty
``as_of``                      the feature time (UTC)
``run_id``                     this run (the exploration seed)
=============================  ==========================================================================
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import multiprocessing
import os
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from features.catalog import LIST_FEATURES
from features.list_features import list_matrix
from features.segments import SEGMENTS
from features.snapshots import (
    ENTITY,
    SnapshotError,
    build_snapshots,
    checked_as_of,
    snapshot_file,
    to_utc,
)
from serving.batch_log import ENCODED, LOG_COLUMNS, decision_table, exposure_id, hash_id
from serving.decide import decide
from serving.policy import Holdout, Policy
from serving.scoring import POLICY_FEATURES, Scorer
from serving.types import CHANNELS, CONTROL_ARM

OUTPUT_FORMATS = (".parquet", ".csv")
NO_NBO_NOTE = "no next-best-offer champion: offer columns empty"
NO_SEND_TIME_NOTE = "no send-time champion: send time empty"
# Columns Scorer.score reads besides the models' own (see serving/scoring.py).
_SCORER_COLUMNS = ("orders_365d", "revenue_365d", "orders_lifetime", "revenue_lifetime", "tenure_days",
                   "days_since_last_purchase", "days_since_unsubscribe", "days_since_last_complaint",
                   "days_since_last_message", "messages_30d", "segment", "timezone",
                   "email_consent", "sms_consent", "push_consent")
_TS = pa.timestamp("us", tz="UTC")
OUTPUT_SCHEMA = pa.schema([
    ("rank", pa.int64()),
    ("customer_id", pa.string()),
    ("exposure_id", pa.string()),
    ("churn_probability", pa.float64()),
    ("risk_tier", pa.string()),
    ("segment", pa.string()),
    ("expected_value", pa.float64()),
    ("value_at_risk", pa.float64()),
    ("reason_codes", pa.string()),
    ("action", pa.string()),
    ("action_reason", pa.string()),
    ("holdout", pa.bool_()),
    ("intended_action", pa.string()),
    ("best_offer", pa.string()),
    ("offer_uplift", pa.float64()),
    ("expected_incremental_profit", pa.float64()),
    ("propensity", pa.float64()),
    ("channel", pa.string()),
    ("expected_open_rate", pa.float64()),
    ("send_at", _TS),
    ("send_at_local", pa.string()),
    ("timezone", pa.string()),
    ("churn_model_version", pa.string()),
    ("nbo_model_version", pa.string()),
    ("send_time_model_version", pa.string()),
    ("note", pa.string()),
    ("as_of", _TS),
    ("run_id", pa.string()),
])
# The chunk step's output: every column but the rank (given after the global sort).
CHUNK_SCHEMA = pa.schema([f for f in OUTPUT_SCHEMA if f.name != "rank"])
# Sort keys, in order: (column, descending). Nulls last everywhere; ``_acting`` = action != "none", or for the
# control group intended_action != "none" (see the module docstring).
SORT_KEYS = (("_acting", True), ("expected_incremental_profit", True), ("value_at_risk", True),
             ("customer_id", False))


class BatchError(ValueError):
    """A batch run cannot start or finish (bad option, no model, no data): a clear one-line reason."""


@dataclass
class BatchOptions:
    """What to score and where to write it (see `engage score --help`)."""

    as_of: datetime | str | None = None  # default: just after the last loaded event
    out: Path | str | None = None  # .parquet or .csv (Spark: also a folder); default under <home>/scores/
    min_churn: float | None = None
    segments: Sequence[str] = ()
    top: int | None = None
    channel: str | None = None
    overwrite: bool = False
    chunk_size: int = 50_000
    workers: int = 0  # local engine processes; 0 = one per CPU
    run_id: str | None = None  # the exploration seed; default: derived from as-of, champions, policy, channel
    chart: bool = True
    log_decisions: bool = True  # append the listed rows' decisions to the decision log (serving database)


@dataclass(frozen=True)
class ChunkContext:
    """Everything :func:`score_chunk` needs; picklable (shipped to worker processes and Spark executors)."""

    scorer: Scorer
    policy: Policy
    as_of: datetime
    run_id: str
    versions: dict[str, str]
    segments: tuple[str, ...] = ()
    min_churn: float | None = None
    channel: str | None = None
    # Reason codes in the scoring pass (every scored row is written: no top, min-churn or channel filter);
    # otherwise a second pass adds them to the listed rows only.
    inline_reasons: bool = False

    @property
    def intended_policy(self) -> Policy:
        """The policy without its control group: what a holdout member would have been given."""
        cached = self.__dict__.get("_intended")
        if cached is None:
            cached = self.policy.model_copy(update={"holdout": Holdout(share=0.0, salt=self.policy.holdout.salt)})
            object.__setattr__(self, "_intended", cached)
        return cached

    @property
    def id_key(self) -> str:
        """What makes this run's ids: the as-of time, the champion versions and the run id."""
        return _id_key(self.as_of, self.versions, self.run_id)


def _id_key(as_of: datetime, versions: dict[str, str], run_id: str) -> str:
    return "\x1f".join([to_utc(as_of).isoformat(), json.dumps(versions, sort_keys=True), run_id])


def default_run_id(as_of: datetime, versions: dict[str, str], policy: Policy, channel: str | None) -> str:
    """The run id when none is given: the same job (as-of time, champions, policy, channel) gets the same one."""
    key = _id_key(as_of, versions, "") + "\x1f" + policy.model_dump_json() + "\x1f" + (channel or "")
    return "batch-" + hash_id(key)[:20]


@dataclass
class BatchPlan:
    home: Path
    as_of: datetime
    snapshot: Path
    out: Path
    chart: Path | None
    columns: list[str]  # snapshot columns read
    rows: int  # customers in the snapshot
    context: ChunkContext
    options: BatchOptions
    notes: list[str] = field(default_factory=list)
    engine: object = None  # SQLAlchemy engine of the decision log (None: not logged)


@dataclass
class BatchSummary:
    engine: str
    as_of: datetime
    scored: int  # customers scored (after the segment filter)
    listed: int  # rows written
    by_tier: dict[str, int]
    by_segment: dict[str, int]
    by_action: dict[str, int]
    value_at_risk: float  # total over the list
    expected_profit: float | None  # total expected incremental profit of the list (None: no offer model)
    seconds: float
    out: Path | str
    chart: Path | None
    versions: dict[str, str]
    notes: list[str]
    holdout: int = 0  # listed rows in the control group
    logged: int | None = None  # decisions appended to the decision log (None: not logged)
    decision_log: str | None = None  # where (URL, password hidden)
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage (local engine)

    @property
    def rate(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else float("nan")


# -- plan -----------------------------------------------------------------------------------------------


def default_out(home: Path, as_of: datetime) -> Path:
    return home / "scores" / f"winback_as_of={to_utc(as_of):%Y%m%dT%H%M%SZ}.parquet"


def chart_path(out: Path) -> Path:
    return out.with_suffix(".png")


def _writable_folder(path: Path) -> None:
    """The first existing folder above ``path`` accepts a new file (probed: permissions alone lie for root)."""
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise BatchError(f"cannot write {path}: {folder} is not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".engage-write-probe-"):
            pass
    except OSError as exc:
        raise BatchError(f"cannot write in {folder}: {exc.strerror or exc}") from exc


def check_output(out: Path, overwrite: bool, *, directory_ok: bool = False) -> Path | None:
    """Validate the output path; returns the chart path (None for a Spark folder output)."""
    suffix = out.suffix.lower()
    if suffix not in OUTPUT_FORMATS and not directory_ok:
        raise BatchError(f"--out {out}: use a .parquet or .csv file")
    chart = chart_path(out) if suffix in OUTPUT_FORMATS else out.with_name(out.name + ".png")
    for p in (out, chart):
        if p.exists() and not overwrite:
            raise BatchError(f"{p} already exists: pass --overwrite to replace it")
        if p.exists() and p.is_dir() and p == out and not directory_ok:
            raise BatchError(f"{p} is a folder")
    _writable_folder(out)
    return chart


def check_filters(options: BatchOptions, policy: Policy) -> None:
    if options.min_churn is not None and not (0.0 <= options.min_churn <= 1.0):
        raise BatchError(f"--min-churn {options.min_churn:g} is outside [0, 1]")
    unknown = sorted(set(options.segments) - set(SEGMENTS))
    if unknown:
        raise BatchError(f"unknown segment(s) {', '.join(unknown)}: use {', '.join(SEGMENTS)}")
    if options.channel is not None and (options.channel not in CHANNELS or options.channel not in policy.channels):
        known = [c for c in CHANNELS if c in policy.channels]
        raise BatchError(f"unknown channel '{options.channel}': use {', '.join(known)}")
    if options.top is not None and options.top < 1:
        raise BatchError("--top must be at least 1")
    if options.chunk_size < 1:
        raise BatchError("chunk size must be at least 1")


def resolve_as_of(home: Path, as_of: datetime | str | None) -> datetime:
    """The as-of time, checked against the loaded data (after the first signup, not after the last event)."""
    from features.load import connect_warehouse, warehouse_path

    if not warehouse_path(home).exists():
        raise BatchError(f"no data loaded in {home}: run `engage ingest DIR` first")
    con = connect_warehouse(home, read_only=True)
    try:
        return checked_as_of(con, as_of, BatchError)
    except SnapshotError as exc:
        raise BatchError(str(exc)) from exc
    finally:
        con.close()


def ensure_snapshot(home: Path, as_of: datetime) -> Path:
    """The snapshot file at ``as_of``: built when missing or older than the last load."""
    from engage.config import config_path, load_config
    from features.load import connect_warehouse

    path = snapshot_file(home, as_of)
    con = connect_warehouse(home, read_only=True)
    try:
        rows = con.execute("SELECT max(loaded_at) FROM loads").fetchall()
        last_load = to_utc(rows[0][0]).timestamp() if rows and rows[0][0] is not None else 0.0
        if not path.exists() or path.stat().st_mtime < last_load:
            build_snapshots(con, home, load_config(config_path(home)).features, [as_of])
    except SnapshotError as exc:
        raise BatchError(str(exc)) from exc
    finally:
        con.close()
    return path


def load_champions(home: Path):
    """The champion ModelSet from the registry; a churn champion is required."""
    from features.store import open_store
    from serving.models import ModelLoadError, champion_versions, load_models
    from serving.service import registry_client

    client = registry_client()
    try:
        wanted = champion_versions(client)
    except Exception as exc:  # registry unreachable or broken
        raise BatchError(f"cannot read the model registry: {type(exc).__name__}: {exc}") from exc
    if "churn" not in wanted:
        raise BatchError("no churn champion model is registered: run `engage train all` first")
    try:
        return load_models(client, open_store(home), wanted)
    except ModelLoadError as exc:
        raise BatchError(str(exc)) from exc


def input_columns(scorer: Scorer, available: Iterable[str]) -> list[str]:
    """The snapshot columns the scorer and the policy read (those the file has)."""
    wanted = {ENTITY, *_SCORER_COLUMNS}
    for plan_ in scorer.plans.values():
        wanted.update(plan_.stored)
    for names in POLICY_FEATURES.values():
        wanted.update(names)
    return [c for c in available if c in wanted]


def plan(home: Path, options: BatchOptions, *, policy: Policy | None = None, directory_ok: bool = False,
         models=None) -> BatchPlan:
    """Check everything that can be checked before scoring; see the module docstring."""
    from serving.policy import PolicyError, load_policy, policy_path

    try:
        policy = policy or load_policy(policy_path(home))
    except PolicyError as exc:
        raise BatchError(str(exc)) from exc
    check_filters(options, policy)
    as_of = resolve_as_of(home, options.as_of)
    out = Path(options.out) if options.out is not None else default_out(home, as_of)
    chart = check_output(out, options.overwrite, directory_ok=directory_ok)
    if not options.chart:
        chart = None
    models = models or load_champions(home)
    snapshot = ensure_snapshot(home, as_of)
    from serving.suppression import drop_suppressed_rows  # forgotten customers are never scored

    drop_suppressed_rows(home, snapshot)
    meta = pq.ParquetFile(snapshot)
    columns = input_columns(models.scorer, meta.schema_arrow.names)
    versions = models.versions
    notes = []
    if "next_best_offer" not in versions:
        notes.append(NO_NBO_NOTE)
    if "send_time" not in versions:
        notes.append(NO_SEND_TIME_NOTE)
    run_id = options.run_id or default_run_id(as_of, versions, policy, options.channel)
    inline = options.top is None and options.min_churn is None and options.channel is None
    context = ChunkContext(models.scorer, policy, as_of, run_id, versions,
                           tuple(dict.fromkeys(options.segments)), options.min_churn, options.channel, inline)
    engine = decision_log_engine(home) if options.log_decisions else None
    return BatchPlan(home, as_of, snapshot, out, chart, columns, meta.metadata.num_rows, context, options, notes,
                     engine)


def decision_log_engine(home: Path):
    """The serving database's engine (``ENGAGE_SERVING_DB_URL`` or the default), checked before any scoring."""
    from serving.servingdb import create_serving_engine

    try:
        engine = create_serving_engine(home=home)
    except Exception as exc:  # unreachable, refused, bad URL: say so before an hour of scoring
        raise BatchError(f"cannot open the decision log: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    engine.dispose()  # no connection is carried into the forked workers
    return engine


# -- the chunk step (shared with Spark) ------------------------------------------------------------------


def chunk_values(batch: pa.RecordBatch | pa.Table) -> dict[str, object]:
    """Feature columns in the form ``Scorer.score`` takes: numbers as float arrays, the rest as lists."""
    values: dict[str, object] = {}
    for name, col in zip(batch.schema.names, batch.columns, strict=True):
        t = col.type
        if pa.types.is_integer(t) or pa.types.is_floating(t):
            values[name] = col.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
        elif name in LIST_FEATURES:  # an (n, width) array
            values[name] = list_matrix(name, col)
        else:  # strings and booleans: python values (consent must be a real False, categories str)
            values[name] = col.to_pylist()
    return values


def _num(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def score_chunk(ctx: ChunkContext, batch: pa.RecordBatch | pa.Table) -> pa.Table:
    """Score and decide one chunk of snapshot rows; returns rows in :data:`CHUNK_SCHEMA` (unranked)."""
    if ctx.segments and batch.num_rows:
        batch = batch.filter(pc.is_in(batch.column("segment"), value_set=pa.array(ctx.segments)))
    n = batch.num_rows
    if n == 0:
        return CHUNK_SCHEMA.empty_table()
    ids = batch.column(ENTITY).to_pylist()
    scores = ctx.scorer.score(ids, chunk_values(batch), [ctx.as_of] * n, reasons=ctx.inline_reasons,
                              open_hours=ctx.policy.open_hour_list)
    if ctx.min_churn is not None:
        scores = [s for s in scores if s.churn_probability is not None and s.churn_probability >= ctx.min_churn]
    has_nbo, has_st = "next_best_offer" in ctx.versions, "send_time" in ctx.versions
    note = "; ".join(([] if has_nbo else [NO_NBO_NOTE]) + ([] if has_st else [NO_SEND_TIME_NOTE])) or None
    channels = [ctx.channel] if ctx.channel is not None else None
    id_key = ctx.id_key
    cols: dict[str, list] = {f.name: [] for f in CHUNK_SCHEMA}
    for sc in scores:
        d = decide(sc, ctx.policy, ctx.as_of, channels=channels, max_offers=0, request_id=ctx.run_id)
        # The control group: the offer columns (and the channel filter) use what they would have got.
        shown = decide(sc, ctx.intended_policy, ctx.as_of, channels=channels, max_offers=0,
                       request_id=ctx.run_id) if d.holdout else d
        if ctx.channel is not None and shown.channel != ctx.channel:
            continue
        acting = d.action != "none"
        offer = shown.chosen_offer
        uplift = profit = None
        if offer is not None:
            k = sc.arms.index(offer)
            p = sc.p_convert
            uplift = float(p[k] - p[sc.arms.index(CONTROL_ARM)])
            profit = float(sc.incremental_profit[k])
        elif shown.action != "none" and has_nbo:
            profit = 0.0
        timed = acting and has_st
        cols["customer_id"].append(d.customer_id)
        cols["exposure_id"].append(exposure_id(id_key, d.customer_id) if acting else None)
        cols["churn_probability"].append(d.churn_probability)
        cols["risk_tier"].append(d.risk_tier)
        cols["segment"].append(d.segment)
        cols["expected_value"].append(_num(sc.expected_value))
        cols["value_at_risk"].append(_num(d.expected_value_at_risk))
        # Inline, or filled for the listed rows only by a second pass (reasons_chunk).
        cols["reason_codes"].append(";".join(sc.churn_reasons) if ctx.inline_reasons else None)
        cols["action"].append(d.action)
        cols["action_reason"].append(d.reason)
        cols["holdout"].append(d.holdout)
        cols["intended_action"].append(d.intended_action if d.holdout else None)
        cols["best_offer"].append(offer)
        cols["offer_uplift"].append(uplift)
        cols["expected_incremental_profit"].append(profit)
        cols["propensity"].append(shown.propensity)
        cols["channel"].append(d.channel)
        cols["expected_open_rate"].append(d.expected_open_rate if timed else None)
        cols["send_at"].append(d.send_at if timed else None)
        cols["send_at_local"].append(d.send_at_local.isoformat() if timed and d.send_at_local else None)
        cols["timezone"].append(sc.timezone)
    m = len(cols["customer_id"])
    cols["churn_model_version"] = [ctx.versions.get("churn")] * m
    cols["nbo_model_version"] = [ctx.versions.get("next_best_offer")] * m
    cols["send_time_model_version"] = [ctx.versions.get("send_time")] * m
    cols["note"] = [note] * m
    cols["as_of"] = [ctx.as_of] * m
    cols["run_id"] = [ctx.run_id] * m
    return pa.Table.from_pydict(cols, schema=CHUNK_SCHEMA)


REASON_SCHEMA = pa.schema([(ENTITY, pa.string()), ("reason_codes", pa.string())])


def reasons_chunk(ctx: ChunkContext, batch: pa.RecordBatch | pa.Table, listed: pa.Array | None) -> pa.Table:
    """Churn reason codes (``;``-joined) of the rows of ``batch`` whose customer is in ``listed`` (None = all).

    A second pass, so only the customers that made the list pay for their SHAP values
    (``training.treeshap``: about a tenth of LightGBM's ``pred_contrib`` per customer, still more than the scores).
    """
    if listed is not None and batch.num_rows:
        batch = batch.filter(pc.is_in(batch.column(ENTITY), value_set=listed))
    n = batch.num_rows
    if n == 0:
        return REASON_SCHEMA.empty_table()
    codes = ctx.scorer.churn_reasons(chunk_values(batch), n)
    return pa.table({ENTITY: batch.column(ENTITY), "reason_codes": [";".join(c) for c in codes]},
                    schema=REASON_SCHEMA)


# -- rank, write, summarize ------------------------------------------------------------------------------


def _sort_options() -> pc.SortOptions:
    keys = [(k, "descending" if desc else "ascending") for k, desc in SORT_KEYS]
    try:  # pyarrow >= 25: null placement per key
        return pc.SortOptions([(k, o, "at_end") for k, o in keys])
    except (TypeError, ValueError):
        return pc.SortOptions(keys, null_placement="at_end")


def acting_mask(table: pa.Table) -> pa.ChunkedArray:
    """``_acting`` of :data:`SORT_KEYS`: an action, or (control group) an intended action."""
    intended = pc.fill_null(pc.not_equal(table.column("intended_action"), "none"), False)
    held = pc.and_(pc.fill_null(table.column("holdout"), False), intended)
    return pc.or_(pc.not_equal(table.column("action"), "none"), held)


def rank(table: pa.Table, top: int | None = None) -> pa.Table:
    """Sort by :data:`SORT_KEYS` (nulls last), keep ``top`` rows, number them: :data:`OUTPUT_SCHEMA`."""
    keyed = table.append_column("_acting", acting_mask(table))
    order = pc.sort_indices(keyed, options=_sort_options())
    if top is not None:
        order = order.slice(0, top)
    out = table.take(order)
    return out.add_column(0, "rank", pa.array(np.arange(1, out.num_rows + 1, dtype=np.int64)))


def _tmp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yields a temporary path beside ``path``; renamed onto it when the block succeeds, removed otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_atomic(table: pa.Table, out: Path, chart: Path | None) -> None:
    """The list and its chart, each via a temporary file and a rename; the list lands last."""
    fmt = out.suffix.lower()
    with contextlib.ExitStack() as stack:
        png = stack.enter_context(atomic_path(chart)) if chart is not None else None
        tmp = stack.enter_context(atomic_path(out))
        if fmt == ".csv":
            write_table_csv(table, tmp)
        else:
            pq.write_table(table, tmp, compression="zstd")
        if png is not None:
            draw_chart(table.column("churn_probability").to_numpy(zero_copy_only=False),
                       treated_profit(table.column("expected_incremental_profit").to_numpy(zero_copy_only=False),
                                      table.column("holdout").to_numpy(zero_copy_only=False)),
                       table.column("value_at_risk").to_numpy(zero_copy_only=False), png)


def treated_profit(profit: np.ndarray, holdout: np.ndarray) -> np.ndarray:
    """Expected profit of the rows that are acted on: the control group's (intended) profit is not earned."""
    return np.where(np.asarray(holdout, dtype=bool), np.nan, np.asarray(profit, dtype=float))


def write_table_csv(table: pa.Table, path: Path) -> None:
    import pyarrow.csv as pacsv

    for name in ("send_at", "as_of"):
        i = table.schema.get_field_index(name)
        seconds = pc.cast(table.column(name), pa.timestamp("s", tz="UTC"), safe=False)
        table = table.set_column(i, name, pc.strftime(seconds, format="%Y-%m-%dT%H:%M:%SZ"))
    pacsv.write_csv(table, path)


def draw_chart(churn: np.ndarray, profit: np.ndarray, value_at_risk: np.ndarray, path: Path) -> None:
    """Two panels: churn probability histogram, and the list's cumulative expected profit by rank
    (cumulative value at risk when there is no offer model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    churn = np.asarray(churn, dtype=float)
    profit = np.asarray(profit, dtype=float)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.hist(churn[~np.isnan(churn)], bins=40, range=(0, 1), color="#c0504d")
    a.set(title="Churn probability", xlabel="P(churn)", ylabel="customers")
    if np.isnan(profit).all():
        curve, label = np.cumsum(np.nan_to_num(np.asarray(value_at_risk, dtype=float))), "cumulative value at risk"
    else:
        curve, label = np.cumsum(np.nan_to_num(profit)), "cumulative expected incremental profit"
    b.plot(np.arange(1, len(curve) + 1), curve, color="#4f81bd")
    b.set(title="The list, in rank order", xlabel="customers contacted (rank)", ylabel=label)
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def summarize(columns: dict[str, np.ndarray | list], *, engine: str, plan_: BatchPlan, scored: int,
              seconds: float, out: Path | str) -> BatchSummary:
    """Counts and totals of the written list (columns: risk_tier, segment, action, holdout, value_at_risk,
    expected_incremental_profit)."""
    holdout = np.asarray(columns["holdout"], dtype=bool)
    profit = treated_profit(columns["expected_incremental_profit"], holdout)
    var = np.asarray(columns["value_at_risk"], dtype=float)
    has_nbo = "next_best_offer" in plan_.context.versions
    return BatchSummary(
        engine=engine, as_of=plan_.as_of, scored=scored, listed=len(var),
        by_tier=dict(Counter(columns["risk_tier"]).most_common()),
        by_segment=dict(Counter(columns["segment"]).most_common()),
        by_action=dict(Counter(columns["action"]).most_common()),
        value_at_risk=float(np.nansum(var)), expected_profit=float(np.nansum(profit)) if has_nbo else None,
        seconds=seconds, out=out, chart=plan_.chart, versions=dict(plan_.context.versions), notes=list(plan_.notes),
        holdout=int(holdout.sum()),
    )


# -- the decision log ------------------------------------------------------------------------------------

LOG_BATCH_ROWS = 50_000  # rows prepared at a time (all of them in one transaction)


def log_decisions(plan_: BatchPlan, listed: pa.Table, on_progress: Callable[[int], None] | None = None) -> int:
    """Append the listed rows' decisions to the decision log (after the list is written); returns how many.

    All rows go in one transaction (:func:`serving.servingdb.bulk_insert`, prepared :data:`LOG_BATCH_ROWS` at a
    time), skipping decision and exposure ids already logged: a re-run of the same job adds nothing. Raises
    :class:`BatchError` when the database refuses or cannot be reached: the list is written, none of its
    decisions are logged, and running the same job again logs them.
    """
    from serving.decision_log import _describe
    from serving.servingdb import bulk_insert, decisions

    if plan_.engine is None:
        return 0
    ctx = plan_.context
    # In customer order: the log's ids follow it (batch_log._batch_id), so its indexes are appended to. Only
    # the columns a log row is made of are taken.
    order = pc.sort_indices(listed.column("customer_id"))
    logged = listed.select(list(LOG_COLUMNS))
    chunks = (decision_table(logged.take(order.slice(start, LOG_BATCH_ROWS)), id_key=ctx.id_key,
                             run_id=ctx.run_id, as_of=ctx.as_of, versions=ctx.versions)
              for start in range(0, listed.num_rows, LOG_BATCH_ROWS))
    try:
        return bulk_insert(plan_.engine, decisions, chunks, encoded=ENCODED, on_chunk=on_progress)
    except Exception as exc:  # refused or unreachable: nothing is logged (one transaction); say how to finish
        raise BatchError(f"wrote {plan_.out}, but its {listed.num_rows:,} decisions did not reach the decision log "
                         f"({decision_log_url(plan_.engine)}, table {decisions.name}): {_describe(exc)}. Feedback "
                         "for them is refused until they are logged: run the same command again with --overwrite "
                         "(nothing is logged twice)") from exc


def decision_log_url(engine) -> str:
    return engine.url.render_as_string(hide_password=True)


# -- the local engine ------------------------------------------------------------------------------------

# (step, context, snapshot path, columns, chunk rows, listed ids) for forked workers; set before forking.
_WORKER: tuple | None = None


def _step(step: str, ctx: ChunkContext, table: pa.Table, listed: pa.Array | None) -> pa.Table:
    return score_chunk(ctx, table) if step == "score" else reasons_chunk(ctx, table, listed)


def _run_task(groups: list[int]) -> tuple[pa.Table, int]:
    step, ctx, path, columns, chunk, listed = _WORKER  # type: ignore[misc]
    return _file_part(step, ctx, path, columns, chunk, groups, listed)


def _file_part(step: str, ctx: ChunkContext, path: str, columns: list[str], chunk: int, groups: list[int],
               listed: pa.Array | None) -> tuple[pa.Table, int]:
    """One task: read some row groups, run ``step`` over them ``chunk`` rows at a time; (rows, customers in)."""
    table = pq.ParquetFile(path).read_row_groups(groups, columns=columns)
    parts = [_step(step, ctx, table.slice(start, chunk), listed) for start in range(0, table.num_rows, chunk)]
    n = table.num_rows
    if ctx.segments:
        n = int(pc.sum(pc.is_in(table.column("segment"), value_set=pa.array(ctx.segments))).as_py() or 0)
    empty = CHUNK_SCHEMA.empty_table() if step == "score" else REASON_SCHEMA.empty_table()
    return (pa.concat_tables(parts) if parts else empty), n


def _tasks(pf: pq.ParquetFile, chunk: int) -> list[list[int]]:
    """Row groups in tasks of about ``chunk`` rows (a big row group is one task)."""
    tasks, current, rows = [], [], 0
    for i in range(pf.metadata.num_row_groups):
        current.append(i)
        rows += pf.metadata.row_group(i).num_rows
        if rows >= chunk:
            tasks.append(current)
            current, rows = [], 0
    if current:
        tasks.append(current)
    return tasks


def _map_snapshot(plan_: BatchPlan, step: str, columns: list[str], listed: pa.Array | None = None,
                  on_progress: Callable[[int], None] | None = None) -> tuple[pa.Table, int]:
    """Run a chunk step over the whole snapshot, in ``workers`` forked processes (models shared by fork)."""
    global _WORKER
    opts = plan_.options
    path = str(plan_.snapshot)
    pf = pq.ParquetFile(path)
    tasks = _tasks(pf, opts.chunk_size)
    sizes = [sum(pf.metadata.row_group(i).num_rows for i in g) for g in tasks]
    workers = max(1, min(opts.workers or os.cpu_count() or 1, len(tasks)))
    parts, total = [], 0

    def done(part: pa.Table, n: int, size: int) -> None:
        nonlocal total
        parts.append(part)
        total += n
        if on_progress:
            on_progress(size)

    if workers == 1:
        for groups, size in zip(tasks, sizes, strict=True):
            done(*_file_part(step, plan_.context, path, columns, opts.chunk_size, groups, listed), size)
    else:
        _WORKER = (step, plan_.context, path, columns, opts.chunk_size, listed)
        # Objects the workers inherit (models, policy) go to the collector's permanent generation first: the
        # workers' collections then never walk them (nor touch, and so copy, their pages).
        gc.freeze()
        try:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                for (part, n), size in zip(pool.imap(_run_task, tasks), sizes, strict=True):
                    done(part, n, size)
        finally:
            _WORKER = None
            gc.unfreeze()
    empty = CHUNK_SCHEMA.empty_table() if step == "score" else REASON_SCHEMA.empty_table()
    return (pa.concat_tables(parts) if parts else empty), total


def score_local(plan_: BatchPlan, on_progress: Callable[[int], None] | None = None) -> tuple[pa.Table, int]:
    """Score and decide every customer of the snapshot; returns (unranked rows, customers scored)."""
    return _map_snapshot(plan_, "score", plan_.columns, on_progress=on_progress)


def add_reasons(plan_: BatchPlan, ranked: pa.Table) -> pa.Table:
    """Fill ``reason_codes`` of the listed rows (a second pass over the snapshot, for them only)."""
    if ranked.num_rows == 0:
        return ranked
    listed = ranked.column(ENTITY).combine_chunks()
    codes, _ = _map_snapshot(plan_, "reasons", plan_.columns, listed=listed)
    return fill_reasons(ranked, codes)


def fill_reasons(ranked: pa.Table, codes: pa.Table) -> pa.Table:
    lookup = dict(zip(codes.column(ENTITY).to_pylist(), codes.column("reason_codes").to_pylist(), strict=True))
    filled = pa.array([lookup.get(c) for c in ranked.column(ENTITY).to_pylist()], type=pa.string())
    return ranked.set_column(ranked.schema.get_field_index("reason_codes"), "reason_codes", filled)


def run_local(plan_: BatchPlan, on_progress: Callable[[int], None] | None = None,
              on_log: Callable[[int], None] | None = None) -> tuple[pa.Table, BatchSummary]:
    """Score, rank, write atomically, log the decisions, summarize; returns (the written list, summary)."""
    started = time.perf_counter()
    clock = _StageClock()
    rows, scored = score_local(plan_, on_progress)
    clock.lap("score and decide")
    ranked = rank(rows, plan_.options.top)
    clock.lap("rank")
    if not plan_.context.inline_reasons:
        ranked = add_reasons(plan_, ranked)
        clock.lap("reason codes")
    write_atomic(ranked, plan_.out, plan_.chart)
    clock.lap("write list and chart")
    logged = log_decisions(plan_, ranked, on_log) if plan_.engine is not None else None
    if logged is not None:
        clock.lap("decision log")
    seconds = time.perf_counter() - started
    cols = {name: ranked.column(name).to_numpy(zero_copy_only=False) if name in (
        "value_at_risk", "expected_incremental_profit", "holdout") else ranked.column(name).to_pylist()
        for name in ("risk_tier", "segment", "action", "holdout", "value_at_risk", "expected_incremental_profit")}
    summary = summarize(cols, engine="local", plan_=plan_, scored=scored, seconds=seconds, out=plan_.out)
    summary.stages = clock.stages
    return ranked, _logged(summary, plan_, logged)


class _StageClock:
    """Seconds per stage of a run, in order."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.stages[name] = self.stages.get(name, 0.0) + now - self._last
        self._last = now


def _logged(summary: BatchSummary, plan_: BatchPlan, logged: int | None) -> BatchSummary:
    summary.logged = logged
    summary.decision_log = decision_log_url(plan_.engine) if plan_.engine is not None else None
    return summary


def score(home: Path, options: BatchOptions, engine: str = "local", *, spark_master: str | None = None,
          on_progress: Callable[[int], None] | None = None, on_plan: Callable[[BatchPlan], None] | None = None
          ) -> BatchSummary:
    """Plan and run one batch scoring job on the ``local`` or ``spark`` engine."""
    if engine not in ("local", "spark"):
        raise BatchError(f"unknown engine '{engine}': use local or spark")
    plan_ = plan(home, options, directory_ok=engine == "spark")
    if on_plan:
        on_plan(plan_)
    if engine == "spark":
        from serving.spark_batch import run_spark

        return run_spark(plan_, master=spark_master)
    return run_local(plan_, on_progress)[1]
