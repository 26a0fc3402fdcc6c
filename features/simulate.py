"""Synthetic customer world with ground truth, written in the Engage data contract.

``simulate`` writes ``customers``, ``events``, ``offers`` and ``exposures`` (Parquet or CSV)
plus ``ground_truth.parquet``: per customer, the true churn probability at ``truth_at``, the
true open probability curve per channel and the true conversion probability per offer.
Models are scored against that truth. The latent world itself (traits, rates, the state
process and the exact truth recursion) lives in ``features/_simworld.py``.

Ground truth columns: customer_id, truth_at, true_churn_prob (P(no purchase in
(truth_at, truth_at + horizon]) given the latent state at truth_at; null for customers who
sign up at or after truth_at), alive_at_truth, engagement_at_truth, response_type,
price_sensitivity, true_aov, then per channel pref_hour_*, open_base_*, open_width_*,
best_hour_*, then p_convert_none and p_convert_<offer_id> per offer of DEFAULT_OFFERS, and last
organic_purchase_rate (expected organic purchases per day in the week from truth_at).

Hidden traits show in behaviour the way they do in real shops (added 2026-11-23; before, the traits
behind the models' targets barely showed anywhere but in the targets themselves): customers who buy
often also browse often (log session rate correlated 0.6 with log purchase rate), price-sensitive
customers bring discount codes (OFF10, OFF20) to some of their organic orders (``events.offer_id`` on a
purchase with no message behind it). Smaller orders for price-sensitive customers were tried and left
out: they lowered the oracle's profit and the learned policy's ratio to it (20k world, seed 5: 0.378 ->
0.326) without helping any model. None of this touches the state process or
the conversion model, so the ground truth stays exact; the marginal distributions of the rates are
unchanged. Effect on the model-quality bench: see BENCHMARKS.md.

Customers are simulated in chunks of ``chunk_size``, each with its own child of
``np.random.SeedSequence(seed)``, so the output depends only on the arguments (chunk_size
included) and memory stays bounded by about two chunks (one simulated, one being written).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from features import _simworld as w
from features._simworld import CHANNELS

__all__ = ["CHANNELS", "DEFAULT_OFFERS", "DEFAULT_START", "SimulationResult", "simulate",
           "true_conversion_prob", "true_open_prob"]

DEFAULT_START = "2025-01-01T00:00:00+00:00"
DEFAULT_OFFERS = pd.DataFrame(list(w.OFFER_CATALOG),
                              columns=["offer_id", "name", "kind", "cost", "channels", "segments"])

_TS = pa.timestamp("us", tz="UTC")
_SCHEMAS = {
    "customers": pa.schema([("customer_id", pa.string()), ("signup_at", _TS), ("timezone", pa.string()),
                            ("country", pa.string()), ("email_opt_in", pa.bool_()),
                            ("sms_opt_in", pa.bool_()), ("push_opt_in", pa.bool_()),
                            ("age_band", pa.string()), ("household_size", pa.int64()),
                            ("loyalty_member", pa.bool_())]),
    "events": pa.schema([("event_id", pa.string()), ("customer_id", pa.string()), ("event_at", _TS),
                         ("event_type", pa.string()), ("channel", pa.string()),
                         ("amount", pa.float64()), ("offer_id", pa.string())]),
    "offers": pa.schema([("offer_id", pa.string()), ("name", pa.string()), ("kind", pa.string()),
                         ("cost", pa.float64()), ("channels", pa.string()), ("segments", pa.string())]),
    "exposures": pa.schema([("exposure_id", pa.string()), ("customer_id", pa.string()), ("sent_at", _TS),
                            ("channel", pa.string()), ("offer_id", pa.string()),
                            ("propensity", pa.float64()), ("opened_at", _TS), ("clicked", pa.bool_()),
                            ("converted", pa.bool_()), ("revenue", pa.float64())]),
}
_ID_DIGITS = 12  # event and exposure ids: a letter and a zero-padded run-wide counter


@dataclass(frozen=True)
class SimulationResult:
    out_dir: Path
    n_customers: int
    n_events: int
    n_exposures: int
    seconds: float
    files: dict[str, Path]


@dataclass(frozen=True)
class _World:
    cal: w.Calendar
    days: int
    truth_day: int
    horizon: int

    @property
    def end_us(self) -> int:
        return self.cal.start_us + self.days * w.DAY_US


def simulate(n_customers: int, days: int, seed: int, out_dir: Path, *, start: str = DEFAULT_START,
             fmt: str = "parquet", chunk_size: int = 50_000, horizon_days: int = 90,
             progress: bool = True, shift_at: str | None = None, shift: str | None = None) -> SimulationResult:
    """Simulate ``n_customers`` over ``days`` days from ``start`` and write the tables.

    Args:
        n_customers: customers to simulate (>= 1).
        days: length of the observed window in days (>= 1).
        seed: seed of the run; the same arguments give the same rows.
        out_dir: folder to write into (created if missing).
        start: ISO-8601 start of the window; without an offset it is UTC.
        fmt: "parquet" or "csv" for the contract tables; ground truth is always Parquet.
        chunk_size: customers simulated and held in memory at a time.
        horizon_days: churn horizon of the ground truth; ``truth_at`` is
            ``start + days - horizon_days - 1 day``, or the middle of the window when
            ``days <= horizon_days + 1`` (the true churn probability then covers days past it).
        progress: show a progress bar over chunks (on stderr).
        shift_at, shift: from the day of ``shift_at`` on, everyone's behaviour changes: ``purchases`` halves
            organic purchase rates, ``engagement`` halves sessions, purchases and message conversions (a
            drift for `engage monitor` to catch; see ``_simworld.shift_calendar``). Default: no change.
    """
    t0 = time.perf_counter()
    start_ts = _check_args(n_customers, days, fmt, chunk_size, horizon_days, start)
    # With a window no longer than the horizon there is no day whose horizon fits in it;
    # the middle of the window keeps some history, and the truth runs past the window.
    # One day of margin: the horizon then ends a day before the data does, so a label cutoff just after
    # the last event (the default of `engage train`) still sees the whole truth window.
    truth_day = days - horizon_days - 1 if days > horizon_days + 1 else days // 2
    world = _World(w.build_calendar(start_ts, max(days, truth_day + horizon_days)), days,
                   truth_day, horizon_days)
    if shift_at is not None or shift is not None:
        world = _World(w.shift_calendar(world.cal, _shift_day(start_ts, days, shift_at, shift), str(shift)),
                       days, truth_day, horizon_days)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_chunks = -(-n_customers // chunk_size)
    seeds = np.random.SeedSequence(seed).spawn(n_chunks)
    id_width = max(7, len(str(n_customers)))
    ext = "parquet" if fmt == "parquet" else "csv"
    names = ("customers", "events", "offers", "exposures")
    files = {name: out_dir / f"{name}.{ext}" for name in names}
    files["ground_truth"] = out_dir / "ground_truth.parquet"
    n_events = n_exposures = 0
    with ExitStack() as stack:
        writers = {name: stack.enter_context(_AtomicTableWriter(files[name], fmt)) for name in names}
        writers["ground_truth"] = stack.enter_context(_AtomicTableWriter(files["ground_truth"], "parquet"))
        writers["offers"].write(pa.Table.from_pandas(DEFAULT_OFFERS, schema=_SCHEMAS["offers"],
                                                     preserve_index=False))
        # One background thread writes chunk k while chunk k + 1 is simulated (Arrow
        # releases the GIL while encoding), so the second core is not idle.
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=1))
        bar = stack.enter_context(Progress(
            TextColumn("simulating customers"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=Console(stderr=True), disable=not progress))
        task = bar.add_task("chunks", total=n_chunks)
        pending: list[Future[None]] = []
        for k in range(n_chunks):
            first = k * chunk_size
            n = min(chunk_size, n_customers - first)
            tables = _simulate_chunk(np.random.default_rng(seeds[k]), world, first, n, id_width,
                                     n_events, n_exposures)
            n_events += tables["events"].num_rows
            n_exposures += tables["exposures"].num_rows
            for done in pending:
                done.result()  # re-raises a failed write
                bar.advance(task)
            pending = [pool.submit(_write_chunk, writers, tables)]
        for done in pending:
            done.result()
            bar.advance(task)
        for writer in writers.values():
            writer.commit()
    return SimulationResult(out_dir, n_customers, n_events, n_exposures,
                            time.perf_counter() - t0, files)


def _write_chunk(writers: dict[str, _AtomicTableWriter], tables: dict[str, pa.Table]) -> None:
    for name, table in tables.items():
        writers[name].write(table)


def true_open_prob(truth: pd.DataFrame, channel: str, local_hour: np.ndarray | int) -> np.ndarray:
    """P(open within 24 h | customer, channel, sent at ``local_hour``) at ``truth_at``.

    Vectorized over the rows of ``truth``; ``local_hour`` is a scalar or one hour per row.
    """
    if channel not in CHANNELS:
        raise ValueError(f"channel {channel!r} is not one of {', '.join(CHANNELS)}")
    hour = np.asarray(local_hour)
    if np.any((hour < 0) | (hour > 23)):
        raise ValueError("local_hour must be between 0 and 23")
    return w.open_probability(truth[f"open_base_{channel}"].to_numpy(float),
                              truth[f"pref_hour_{channel}"].to_numpy(float),
                              truth[f"open_width_{channel}"].to_numpy(float), hour)


def true_conversion_prob(truth: pd.DataFrame, offer_id: str | None) -> np.ndarray:
    """P(convert | a message with ``offer_id`` at ``truth_at``); ``None`` is the no-offer control."""
    if offer_id is not None and offer_id not in w.OFFER_IDS:
        raise ValueError(f"offer_id {offer_id!r} is not one of {', '.join(w.OFFER_IDS)}")
    return truth[f"p_convert_{offer_id or 'none'}"].to_numpy(float)


def _shift_day(start: pd.Timestamp, days: int, shift_at: str | None, shift: str | None) -> int:
    """The simulation day a shift starts on, checked: both options given, the kind known, inside the window."""
    if shift_at is None or shift is None:
        raise ValueError("a behaviour shift needs both shift_at (a date) and shift (its kind)")
    if shift not in w.SHIFT_KINDS:
        raise ValueError(f"shift {shift!r} is not one of {', '.join(w.SHIFT_KINDS)}")
    try:
        at = pd.Timestamp(shift_at)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"shift_at {shift_at!r} is not an ISO-8601 date, e.g. 2025-10-01") from exc
    at = at.tz_localize("UTC") if at.tzinfo is None else at.tz_convert("UTC")
    day = (at - start) // pd.Timedelta(days=1)
    if not 0 < day < days:
        raise ValueError(f"shift_at {shift_at} is outside the simulated window "
                         f"({start:%Y-%m-%d} to {start + pd.Timedelta(days=days - 1):%Y-%m-%d}, first day excluded)")
    return int(day)


def _check_args(n_customers: int, days: int, fmt: str, chunk_size: int, horizon_days: int,
                start: str) -> pd.Timestamp:
    for name, value in (("n_customers", n_customers), ("days", days), ("chunk_size", chunk_size),
                        ("horizon_days", horizon_days)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    if fmt not in ("parquet", "csv"):
        raise ValueError(f"fmt must be 'parquet' or 'csv', got {fmt!r}")
    try:
        ts = pd.Timestamp(start)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"start {start!r} is not an ISO-8601 timestamp, e.g. {DEFAULT_START!r}") from exc
    if ts is pd.NaT:
        raise ValueError(f"start {start!r} is not an ISO-8601 timestamp, e.g. {DEFAULT_START!r}")
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


class _AtomicTableWriter:
    """Stream tables to a hidden temp file in the target folder; ``commit`` renames it.

    Leaving the context without ``commit`` (an error) deletes the temp file, so a crash
    never leaves a complete-looking output.
    """

    def __init__(self, path: Path, fmt: str) -> None:
        self.path, self.fmt = path, fmt
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self._writer: pq.ParquetWriter | pa_csv.CSVWriter | None = None

    def __enter__(self) -> _AtomicTableWriter:
        return self

    def write(self, table: pa.Table) -> None:
        if self.fmt == "csv":
            table = _iso_timestamps(table)
        if self._writer is None:
            if self.fmt == "csv":
                self._writer = pa_csv.CSVWriter(self.tmp, table.schema,
                                                write_options=pa_csv.WriteOptions(quoting_style="needed"))
            else:
                # Unique ids gain nothing from a dictionary; everything else repeats a lot.
                unique = ("event_id", "exposure_id")
                self._writer = pq.ParquetWriter(
                    self.tmp, table.schema, compression="zstd",
                    use_dictionary=[c for c in table.column_names if c not in unique])
        self._writer.write_table(table)

    def commit(self) -> None:
        if self._writer is None:
            raise RuntimeError(f"nothing was written to {self.path}")
        self._writer.close()
        self._writer = None
        os.replace(self.tmp, self.path)

    def __exit__(self, *exc) -> None:
        if self._writer is not None:
            self._writer.close()
        self.tmp.unlink(missing_ok=True)


def _iso_timestamps(table: pa.Table) -> pa.Table:
    """Timestamps as ISO-8601 text with an explicit UTC offset, for CSV."""
    for i, field in enumerate(table.schema):
        if pa.types.is_timestamp(field.type):
            text = pc.strftime(table.column(i), format="%Y-%m-%dT%H:%M:%S")
            table = table.set_column(i, field.name, pc.binary_join_element_wise(text, "+00:00", ""))
    return table


# ---- one chunk of customers --------------------------------------------------------------

def _simulate_chunk(rng: np.random.Generator, world: _World, first: int, n: int, id_width: int,
                    event_offset: int, exposure_offset: int) -> dict[str, pa.Table]:
    """Simulate customers ``first .. first + n - 1`` and return their rows of every table."""
    tr = w.draw_traits(rng, n, world.days, world.cal.start_us)
    log = w.run_state_process(rng, tr, world.days, world.truth_day)
    cid = _id_bytes(b"C", np.arange(first + 1, first + n + 1), id_width)
    exposures, message_events = _exposures(rng, tr, log, world)
    events = _concat_events([_organic_events(rng, tr, log, world), message_events,
                             _state_events(rng, tr, log, world), _signup_events(rng, tr, world)])
    keep = events["at"] < world.end_us  # opens and clicks after the export are not known yet
    events = {k: v[keep] for k, v in events.items()}
    order = _by_customer_then_time(events["cust"], events["at"])
    events = {k: v[order] for k, v in events.items()}
    m = len(order)
    event_table = pa.table([
        _strings(_id_bytes(b"E", event_offset + 1 + np.arange(m), _ID_DIGITS)),
        _strings(cid[events["cust"]]), _timestamps(events["at"]),
        _labels(w.EVENT_TYPES, events["type"]), _labels(w.EVENT_CHANNELS, events["channel"]),
        pa.array(events["amount"], mask=np.isnan(events["amount"])),
        _labels(w.OFFER_IDS, events["offer"])], schema=_SCHEMAS["events"])

    order = _by_customer_then_time(exposures["cust"], exposures["sent"])
    x = {k: v[order] for k, v in exposures.items()}
    exposure_table = pa.table([
        _strings(_id_bytes(b"X", exposure_offset + 1 + np.arange(len(order)), _ID_DIGITS)),
        _strings(cid[x["cust"]]), _timestamps(x["sent"]), _labels(CHANNELS, x["channel"]),
        _labels(w.OFFER_IDS, x["arm"] - 1), pa.array(x["propensity"]),
        _timestamps(x["opened_at"], mask=~x["opened"]), pa.array(x["clicked"]),
        pa.array(x["converted"]), pa.array(x["revenue"])], schema=_SCHEMAS["exposures"])

    country = np.array([w.TZ_COUNTRY.index(c) if c else -1 for c in w.TZ_COUNTRY])[tr.tz]
    customer_table = pa.table([
        _strings(cid), _timestamps(tr.signup_us), _labels(w.TIMEZONES, tr.tz),
        _labels([c or "" for c in w.TZ_COUNTRY], country),
        pa.array(log.final_consent[:, 0]), pa.array(log.final_consent[:, 1]),
        pa.array(log.final_consent[:, 2]), _labels(w.AGE_BANDS, tr.age_band),
        pa.array(tr.household_size.astype(np.int64)), pa.array(tr.loyal)], schema=_SCHEMAS["customers"])
    return {"customers": customer_table, "events": event_table, "exposures": exposure_table,
            "ground_truth": _truth_table(tr, log, world, cid)}


def _exposures(rng: np.random.Generator, tr: w.Traits, log: w.StateLog,
               world: _World) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Offer, send time, open, click and conversion of every message the state process sent."""
    cal, msg = world.cal, log.messages
    cust, day, ch, alive = msg["customer"], msg["day"], msg["channel"], msg["alive"]
    k, rows = len(cust), np.arange(len(cust))
    probs = w.policy_probs(tr.loyal[cust], w.is_new(cal, tr.signup_us[cust], day), ch)
    cum = np.cumsum(probs, axis=1)
    cum[:, -1] = 1.0
    arm = (rng.random(k)[:, None] >= cum).sum(axis=1)
    arm = np.minimum(arm, _LAST_ARM[ch])  # rounding must never pick an arm the policy excludes
    tz = tr.tz[cust]
    # Send hours are uniform over the day so that the best send hour can be learned.
    sent = w.local_to_utc(cal, tz, day, rng.integers(6, 23, k) * 3600 + rng.random(k) * 3600)
    p_open, p_convert = _message_probabilities(tr, cal, cust, day, ch, alive, w.local_hour(cal, tz, sent))
    u = rng.random((6, k))
    opened = u[0] < p_open
    mean_h = w.OPEN_DELAY_H[ch]
    delay_h = -mean_h * np.log1p(u[1] * np.expm1(-24 / mean_h))  # exponential truncated below 24 h
    late = ~opened & (u[2] < w.LATE_OPEN_SHARE[ch] * p_open)
    delay_h = np.where(late, 24 + rng.exponential(18.0, k), delay_h)
    opened_at = sent + (delay_h * 3.6e9).astype(np.int64)
    opened = (opened | late) & (opened_at < world.end_us)
    click_at = opened_at + (rng.uniform(5, 300, k) * 1e6).astype(np.int64)
    clicked = opened & (u[3] < tr.click_p[cust, ch]) & (click_at < world.end_us)
    converted = u[4] < p_convert[rows, arm]
    revenue = np.where(converted, rng.lognormal(tr.aov_mu[cust], w.ORDER_SIGMA), 0.0)
    # Conversions, unsubscribes and complaints happen later the same day: the state process
    # and the ground truth count them on the day of the send.
    day_end = cal.start_us + (day + 1) * w.DAY_US
    t0 = np.where(opened & (opened_at < day_end), opened_at, sent)
    bought_at = _later_that_day(u[5], t0, day_end)
    reacted_at = _later_that_day(rng.random(k), sent, day_end)

    email, sms, push = ch == 0, ch == 1, ch == 2
    unsub, complaint = msg["unsub"], msg["complaint"]
    events = _concat_events([
        _event(cust[opened & email], opened_at[opened & email], "email_open", 0),
        _event(cust[opened & push], opened_at[opened & push], "push_open", 2),
        _event(cust[clicked & email], click_at[clicked & email], "email_click", 0),
        _event(cust[clicked & sms], click_at[clicked & sms], "sms_click", 1),
        _event(cust[converted], bought_at[converted], "purchase", ch[converted],
               amount=revenue[converted], offer=arm[converted] - 1),
        _event(cust[unsub], reacted_at[unsub], "unsubscribe", ch[unsub]),
        _event(cust[complaint], reacted_at[complaint], "complaint", ch[complaint]),
    ])
    exposures = {"cust": cust, "sent": sent, "channel": ch, "arm": arm,
                 "propensity": probs[rows, arm], "opened_at": opened_at, "opened": opened,
                 "clicked": clicked, "converted": converted, "revenue": revenue}
    return exposures, events


def _message_probabilities(tr: w.Traits, cal: w.Calendar, cust: np.ndarray, day: np.ndarray,
                           channel: np.ndarray, alive: np.ndarray,
                           local_hour: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """P(open within 24 h) and P(convert) per arm of messages, (k,) and (k, N_ARMS).

    The ground truth stores the same quantities for the truth day, so ``true_open_prob``
    and ``true_conversion_prob`` reproduce these numbers exactly for a send at truth_at.
    """
    eng = w.engagement(tr.eng0[cust], tr.decay[cust], tr.onset[cust], day)
    p_open = w.open_probability(w.open_peak(tr.open_rho[cust, channel], eng, alive, channel),
                                tr.pref_hour[cust, channel], tr.open_width[cust, channel], local_hour)
    p_convert = w.conversion_probs(tr.arm_mult[cust], tr.conv_base[cust], eng, cal.conversion[day], alive)
    return p_open, p_convert


_LAST_ARM = np.array([np.flatnonzero(w.POLICY_PROBS[0, 0, c] > 0)[-1] for c in range(len(CHANNELS))])


def _by_customer_then_time(cust: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Stable sort order by (customer, time); one int64 key when it fits (5-10x faster)."""
    if len(at) == 0:
        return np.arange(0)
    base = int(at.min())
    span = int(at.max()) - base + 1
    if (int(cust.max()) + 1) * span < 2**62:
        return np.argsort(cust * span + (at - base), kind="stable")
    return np.lexsort((at, cust))


def _later_that_day(u: np.ndarray, after_us: np.ndarray, day_end_us: np.ndarray) -> np.ndarray:
    """A time at fraction ``u`` of the way from ``after_us`` to the end of its simulation day."""
    span = day_end_us - after_us
    return after_us + np.minimum(np.floor(u * span).astype(np.int64), np.maximum(span - 1, 0))


def _organic_events(rng: np.random.Generator, tr: w.Traits, log: w.StateLog,
                    world: _World) -> dict[str, np.ndarray]:
    """Purchases, sessions and page views of live customers, plus stray views of churned ones."""
    cal, days = world.cal, world.days
    first = np.minimum(tr.first_day, days)
    end = np.minimum(log.death_day, days)
    p_cust, p_day = w.sample_activity(rng, tr, first, end, w.purchase_intensity,
                                      cal.purchase[:days], tr.purchase_rate)
    s_cust, s_day = w.sample_activity(rng, tr, first, end, np.multiply, cal.session[:days],
                                      tr.session_rate)
    store = rng.random(len(p_cust)) < 0.25
    p_local = np.where(store, rng.uniform(9, 21, len(p_cust)) * 3600, _activity_local_s(rng, tr, p_cust))
    p_at = w.local_to_utc(cal, tr.tz[p_cust], p_day, p_local)
    s_at = w.local_to_utc(cal, tr.tz[s_cust], s_day, _activity_local_s(rng, tr, s_cust))
    s_channel = np.where(rng.random(len(s_cust)) < 0.4, w.IN_APP, w.WEB)
    views = rng.poisson(tr.page_views_per_session[s_cust])
    v_cust, v_channel = np.repeat(s_cust, views), np.repeat(s_channel, views)
    v_at = np.repeat(s_at, views) + (rng.uniform(10, 1200, len(v_cust)) * 1e6).astype(np.int64)

    # Price-sensitive customers bring discount codes to organic orders too (codes circulate outside
    # the campaigns); the order is a purchase event with that offer_id, and no message is involved.
    code = rng.random(len(p_cust)) < w.CODE_USE_MAX * tr.sensitivity[p_cust] ** 2
    p_offer = np.where(code, np.asarray(w.DISCOUNT_CODES)[rng.integers(0, len(w.DISCOUNT_CODES), len(p_cust))], -1)
    dead_days = np.where(end < days, days - end, 0)
    d_cust = np.repeat(np.arange(len(end)), rng.poisson(w.DEAD_PAGE_VIEW_RATE * dead_days))
    d_day = end[d_cust] + np.floor(rng.random(len(d_cust)) * dead_days[d_cust]).astype(np.int64)
    d_at = w.local_to_utc(cal, tr.tz[d_cust], d_day, _activity_local_s(rng, tr, d_cust))
    return _concat_events([
        _event(p_cust, p_at, "purchase", np.where(store, w.STORE, w.WEB),
               amount=rng.lognormal(tr.aov_mu[p_cust], w.ORDER_SIGMA), offer=p_offer),
        _event(s_cust, s_at, "session", s_channel),
        _event(v_cust, v_at, "page_view", v_channel),
        _event(d_cust, d_at, "page_view", w.WEB),
    ])


def _activity_local_s(rng: np.random.Generator, tr: w.Traits, cust: np.ndarray) -> np.ndarray:
    """Local time of day of app/web activity: mostly around the customer's in-app hour."""
    k = len(cust)
    near = (tr.pref_hour[cust, 3] + rng.normal(0.0, 1.5, k)) * 3600
    anywhere = rng.uniform(7, 24, k) * 3600
    return np.mod(np.where(rng.random(k) < 0.7, near, anywhere), 86_400.0)


def _state_events(rng: np.random.Generator, tr: w.Traits, log: w.StateLog,
                  world: _World) -> dict[str, np.ndarray]:
    """Support tickets and spontaneous complaints drawn by the state process."""
    (t_cust, t_day), (c_cust, c_day) = log.tickets, log.complaints
    t_at = w.local_to_utc(world.cal, tr.tz[t_cust], t_day, rng.uniform(8, 20, len(t_cust)) * 3600)
    c_at = w.local_to_utc(world.cal, tr.tz[c_cust], c_day, rng.uniform(8, 20, len(c_cust)) * 3600)
    t_channel = np.where(rng.random(len(t_cust)) < 0.5, w.PHONE, w.WEB)
    return _concat_events([_event(t_cust, t_at, "support_ticket", t_channel),
                           _event(c_cust, c_at, "complaint", w.PHONE)])


def _signup_events(rng: np.random.Generator, tr: w.Traits, world: _World) -> dict[str, np.ndarray]:
    """Customers who sign up inside the window do so in a web session with a few page views."""
    cust = np.flatnonzero((tr.signup_us >= world.cal.start_us) & (tr.signup_us < world.end_us))
    s_at = tr.signup_us[cust] + (rng.uniform(30, 600, len(cust)) * 1e6).astype(np.int64)
    views = 1 + rng.poisson(1.0, len(cust))
    v_cust = np.repeat(cust, views)
    v_at = np.repeat(s_at, views) + (rng.uniform(10, 900, len(v_cust)) * 1e6).astype(np.int64)
    return _concat_events([_event(cust, s_at, "session", w.WEB),
                           _event(v_cust, v_at, "page_view", w.WEB)])


def _event(cust, at, event_type: str, channel, *, amount=None, offer=None) -> dict[str, np.ndarray]:
    k = len(cust)
    return {"cust": np.asarray(cust, dtype=np.int64), "at": np.asarray(at, dtype=np.int64),
            "type": np.full(k, w.EVENT_TYPES.index(event_type), dtype=np.int8),
            "channel": np.broadcast_to(np.asarray(channel, dtype=np.int8), (k,)),
            "amount": np.full(k, np.nan) if amount is None else np.asarray(amount, dtype=float),
            "offer": np.full(k, -1, dtype=np.int8) if offer is None else np.asarray(offer, dtype=np.int8)}


def _concat_events(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _truth_table(tr: w.Traits, log: w.StateLog, world: _World, cid: np.ndarray) -> pa.Table:
    """One row per customer: the true answers at ``truth_at`` that models are scored against."""
    cal, d, n = world.cal, world.truth_day, len(tr.tz)
    eng = w.engagement(tr.eng0, tr.decay, tr.onset, d)
    alive = log.truth_alive
    churn = w.no_purchase_probability(tr, cal, d, world.horizon, alive, log.truth_upset,
                                      log.truth_consent)
    cols: dict[str, pa.Array] = {
        "customer_id": _strings(cid),
        "truth_at": _timestamps(np.full(n, cal.start_us + d * w.DAY_US)),
        # Undefined for customers who sign up at or after truth_at.
        "true_churn_prob": pa.array(churn, mask=tr.first_day > d),
        "alive_at_truth": pa.array(alive),
        "engagement_at_truth": pa.array(eng),
        "response_type": _labels(w.RESPONSE_TYPES, tr.response),
        "price_sensitivity": pa.array(tr.sensitivity),
        "true_aov": pa.array(np.exp(tr.aov_mu + w.ORDER_SIGMA**2 / 2)),
    }
    hours = np.arange(24)[None, :]
    for c, name in enumerate(CHANNELS):
        pref, width = tr.pref_hour[:, c], tr.open_width[:, c]
        curve = w.open_probability(1.0, pref[:, None], width[:, None], hours)
        cols[f"pref_hour_{name}"] = pa.array(pref.astype(np.int64))
        cols[f"open_base_{name}"] = pa.array(w.open_peak(tr.open_rho[:, c], eng, alive, c))
        cols[f"open_width_{name}"] = pa.array(width)
        cols[f"best_hour_{name}"] = pa.array(curve.argmax(axis=1).astype(np.int64))
    convert = w.conversion_probs(tr.arm_mult, tr.conv_base, eng, cal.conversion[d], alive)
    for arm, offer_id in enumerate(("none",) + w.OFFER_IDS):
        cols[f"p_convert_{offer_id}"] = pa.array(convert[:, arm])
    # Expected organic purchases per day in the week from truth_at (0 when not alive then): the baseline
    # `engage simulate-respond` draws everybody's purchases from, messages or not.
    week = float(cal.purchase[d:d + 7].mean())
    cols["organic_purchase_rate"] = pa.array(tr.purchase_rate * w.purchase_intensity(eng, week) * alive)
    return pa.table(cols)


# ---- arrow helpers -----------------------------------------------------------------------

# "0000" .. "9999" as little-endian uint32 words: four digits per table lookup.
_DIGIT_QUADS = np.array([[ord(c) for c in f"{i:04d}"] for i in range(10_000)], dtype=np.uint8).view(np.uint32).ravel()


def _id_bytes(prefix: bytes, numbers: np.ndarray, width: int) -> np.ndarray:
    """Fixed-width ids as a (rows, 1 + width) byte matrix: prefix + zero-padded number."""
    groups = -(-width // 4)
    digits = np.empty((len(numbers), groups), dtype=np.uint32)
    rest = np.asarray(numbers, dtype=np.int64)
    for g in range(groups - 1, -1, -1):
        digits[:, g] = _DIGIT_QUADS[rest % 10_000]
        rest = rest // 10_000
    out = np.empty((len(numbers), 1 + width), dtype=np.uint8)
    out[:, 0] = prefix[0]
    out[:, 1:] = digits.view(np.uint8).reshape(len(numbers), 4 * groups)[:, 4 * groups - width:]
    return out


def _strings(rows: np.ndarray) -> pa.Array:
    """A string array from a (rows, width) byte matrix, without a Python loop."""
    rows = np.ascontiguousarray(rows)
    count, width = rows.shape
    offsets = np.arange(0, (count + 1) * width, width, dtype=np.int64)
    return pa.Array.from_buffers(pa.large_string(), count,
                                 [None, pa.py_buffer(offsets), pa.py_buffer(rows)]).cast(pa.string())


def _labels(names, codes: np.ndarray) -> pa.Array:
    """Strings from integer codes; negative codes become nulls."""
    codes = np.asarray(codes)
    return pa.array(list(names), pa.string()).take(pa.array(codes, mask=codes < 0))


def _timestamps(us: np.ndarray, mask: np.ndarray | None = None) -> pa.Array:
    return pa.array(np.asarray(us, dtype=np.int64), mask=mask).cast(_TS)
