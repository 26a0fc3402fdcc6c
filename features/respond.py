"""What the simulated customers do with a batch list: `engage simulate-respond`, closing the loop on the truth.

For every row of a list written by `engage score` (or ``serving.batch``), over the ``days`` after its as-of
time, outcomes are drawn from the simulator's ground truth (``ground_truth.parquet``, see
``features/simulate.py``) as the world stands at ``truth_at``:

* **Treated rows** (an action and an ``exposure_id``) get their message on their channel at ``send_at``,
  or, with probability ``1 - send_at_recommended``, at another daytime hour (08:00-20:00 local, same local
  day, never the recommended hour), so `engage report` can compare open rates. Opened with the true open
  probability at the local hour it went out (``true_open_prob``: a bump around the customer's preferred
  hour), after the channel's usual delay; clicked with the channel's mean click rate (the truth has no
  per-customer click probability); converted with the true conversion probability of the chosen offer, or
  of a message without one (``true_conversion_prob``), independently of the open, as in the simulator. A
  conversion is an order worth a lognormal draw around ``true_aov`` within a day of the send (or open).
* **Everybody listed** (treated, control group, and customers with no action) buys organically: a Poisson
  number of orders at ``organic_purchase_rate`` per day, spread uniformly over the window, web or store.
  Messages add to these orders and never replace them, which is how the simulator builds its world.
* ``effect="none"``: messages and offers change nothing. Opens and clicks still happen, but no message
  converts, so the treated group buys at exactly the organic rate -- an experiment with no true effect.

Each customer's draws come from a hash of (seed, customer id, what is drawn), never from a shared stream,
so a customer's outcome does not depend on the other rows of the list (a list re-scored with slightly
different models keeps every unchanged customer's outcome), and the same seed gives the same files.

Output (:func:`write_contract`): a contract folder `engage ingest` appends -- ``customers`` (no rows: the
loader needs the file, and nobody changes), ``exposures`` (the campaign log: one row per message sent) and
``events`` (purchases with amount and offer id, opens, clicks). A message's events carry the ids
`engage feedback import` gives them (``fb:<exposure_id>:open|click|purchase``), so importing the feedback
later adds nothing twice; organic orders get ``rsp:<run token>:<customer>:<n>``. :func:`post_feedback` posts
one feedback per message (sent, opened, clicked, converted, revenue) to the serving database through
:class:`serving.feedback.FeedbackStore`, which checks each against the logged decision.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from features import _simworld as w
from features.simulate import true_conversion_prob, true_open_prob
from features.truth import TRUTH_FILE

EFFECTS = ("real", "none")
DAYTIME_HOURS = tuple(range(8, 21))  # local hours a campaign tool picks when it ignores the recommendation
STORE_SHARE = 0.25  # organic orders in a store (else on the web), as in the simulator
OPEN_EVENT = {"email": "email_open", "push": "push_open"}  # as serving/feedback_import.py
CLICK_EVENT = {"email": "email_click", "sms": "sms_click"}
LIST_COLUMNS = ("customer_id", "exposure_id", "action", "holdout", "best_offer", "channel", "send_at", "timezone",
                "as_of")
_HOUR = pd.Timedelta(hours=1)
_DAY = pd.Timedelta(days=1)
# Draws, one stream each (a hash of seed, customer and stream number; see _uniform).
_S_FOLLOW, _S_HOUR, _S_OPEN, _S_DELAY, _S_CLICK, _S_CLICK_AT, _S_CONVERT, _S_BUY_AT, _S_AMOUNT = range(9)
_S_ORGANIC = 16  # the count; order k uses 32 + 4k .. 35 + 4k (time, store, amount x2)


class RespondError(ValueError):
    """The list, the truth or the options cannot be used: a one-line reason a person can act on."""


@dataclass
class Responses:
    """What happened: the campaign log (one row per message sent) and the contract events."""

    exposures: pd.DataFrame
    events: pd.DataFrame
    as_of: pd.Timestamp
    end: pd.Timestamp
    listed: int
    treated: int  # rows with an action and an exposure id
    holdout: int
    expected_message_conversions: float  # sum of the true conversion probabilities of the messages sent
    organic_orders: int = 0


@dataclass
class RespondResult:
    out_dir: Path
    files: dict[str, Path]
    responses: Responses
    feedback_posted: int | None  # None: not posted


# -- inputs -------------------------------------------------------------------------------------------


def load_list(path: Path) -> pd.DataFrame:
    """A batch list (.parquet or .csv) with the columns responses need; UTC timestamps."""
    path = Path(path)
    if not path.exists():
        raise RespondError(f"--list {path}: no such file")
    try:
        if path.suffix.lower() == ".csv":
            df = pd.read_csv(path, dtype={"customer_id": str, "exposure_id": str, "best_offer": str})
        else:
            df = pd.read_parquet(path)
    except Exception as exc:  # not a list file at all
        raise RespondError(f"--list {path} cannot be read as a batch list: {type(exc).__name__}: {exc}") from exc
    if "exposure_id" not in df.columns:
        raise RespondError(f"--list {path} has no exposure_id column: it was not written by this version of "
                           "`engage score`; score again to get a list whose messages can be tracked")
    missing = [c for c in LIST_COLUMNS if c not in df.columns]
    if missing:
        raise RespondError(f"--list {path} is not a batch list: column(s) {', '.join(missing)} missing")
    if df.empty:
        raise RespondError(f"--list {path} has no rows")
    df = df[list(LIST_COLUMNS)].copy()
    for c in ("send_at", "as_of"):
        df[c] = pd.to_datetime(df[c], utc=True)
    df["holdout"] = df["holdout"].map(lambda v: str(v).lower() in ("true", "1")).astype(bool)
    for c in ("customer_id", "exposure_id", "action", "best_offer", "channel", "timezone"):
        df[c] = df[c].astype(object).where(df[c].notna(), None)
    if df["customer_id"].duplicated().any():
        raise RespondError(f"--list {path} lists some customers twice")
    if df["as_of"].nunique() != 1:
        raise RespondError(f"--list {path} mixes {df['as_of'].nunique()} as-of times: one list per run")
    acting = df["action"].fillna("none") != "none"
    no_id = acting & df["exposure_id"].isna()
    if no_id.any():
        raise RespondError(f"--list {path}: {int(no_id.sum()):,} rows with an action have no exposure_id "
                           f"(e.g. {', '.join(df.loc[no_id, 'customer_id'].head(3))}); score the list again")
    return df


def load_truth(path: Path) -> pd.DataFrame:
    """The ground truth of a simulated world: a folder with ``ground_truth.parquet`` (or the file)."""
    path = Path(path)
    file = path / TRUTH_FILE if path.is_dir() else path
    if not file.is_file():
        raise RespondError(f"--truth {path}: no {TRUTH_FILE} there (give the folder `engage simulate` wrote, "
                           "or an ENGAGE_HOME it was loaded into)")
    truth = pd.read_parquet(file)
    if "organic_purchase_rate" not in truth.columns:
        raise RespondError(f"--truth {file} has no organic_purchase_rate: it was simulated by an older version; "
                           "simulate the world again")
    return truth.set_index("customer_id")


def match_truth(listed: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """The truth rows of the listed customers, in list order; every customer must be there."""
    found = listed["customer_id"].isin(truth.index)
    if not found.all():
        lost = listed.loc[~found, "customer_id"]
        raise RespondError(f"{len(lost):,} of the {len(listed):,} listed customers are not in the ground truth "
                           f"(e.g. {', '.join(lost.head(3))}): --truth must be the simulated world the list was "
                           "scored on")
    return truth.loc[listed["customer_id"].to_numpy()]


def check_options(days: int, effect: str, send_at_recommended: float) -> None:
    if isinstance(days, bool) or not isinstance(days, int | np.integer) or days < 1:
        raise RespondError(f"--days must be a whole number >= 1, got {days!r}")
    if effect not in EFFECTS:
        raise RespondError(f"--effect {effect!r}: use real or none")
    if not 0.0 <= send_at_recommended <= 1.0:
        raise RespondError(f"--send-at-recommended {send_at_recommended:g} is outside [0, 1]")


# -- keyed draws -----------------------------------------------------------------------------------------

_GOLDEN, _M1, _M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def customer_keys(customer_ids: Sequence[str], seed: int) -> np.ndarray:
    """A 64-bit key per customer from (seed, customer id)."""
    return np.array([int.from_bytes(hashlib.blake2b(f"{seed}\x1f{c}".encode(), digest_size=8).digest(), "big")
                     for c in customer_ids], dtype=np.uint64)


def _uniform(keys: np.ndarray, stream: int | np.ndarray) -> np.ndarray:
    """Uniforms in [0, 1), one per key, independent across streams (splitmix64 of key + stream)."""
    with np.errstate(over="ignore"):
        z = keys + (np.asarray(stream, dtype=np.uint64) + np.uint64(1)) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _normal(keys: np.ndarray, stream: int | np.ndarray) -> np.ndarray:
    u1, u2 = 1.0 - _uniform(keys, stream), _uniform(keys, np.asarray(stream) + 1)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def _poisson(lam: np.ndarray, u: np.ndarray, cap: int = 200) -> np.ndarray:
    """Poisson counts by inverting the CDF at ``u`` (the rates here are small: a few steps)."""
    k = np.zeros(len(lam), dtype=np.int64)
    p = np.exp(-lam)
    cdf = p.copy()
    for j in range(1, cap):
        more = u > cdf
        if not more.any():
            break
        k += more
        p = p * lam / j
        cdf = cdf + p
    return k


def _order_values(truth_aov: np.ndarray, keys: np.ndarray, stream: int | np.ndarray) -> np.ndarray:
    """Order values: lognormal with mean ``true_aov`` and the simulator's spread."""
    mu = np.log(truth_aov) - w.ORDER_SIGMA**2 / 2
    return np.round(np.exp(mu + w.ORDER_SIGMA * _normal(keys, stream)), 2)


# -- the responses ---------------------------------------------------------------------------------------


def simulate_responses(listed: pd.DataFrame, truth: pd.DataFrame, *, days: int = 7, seed: int = 0,
                       effect: str = "real", send_at_recommended: float = 0.8) -> Responses:
    """Draw what happens to every listed customer in the ``days`` after the list's as-of time (pure)."""
    check_options(days, effect, send_at_recommended)
    truth = match_truth(listed, truth)
    as_of = listed["as_of"].iloc[0]
    end = as_of + days * _DAY
    keys = customer_keys(listed["customer_id"].tolist(), seed)
    acting = (listed["action"].fillna("none") != "none").to_numpy()
    exposures, message_events, expected = _messages(listed[acting], truth[acting], keys[acting], as_of, end,
                                                    effect, send_at_recommended)
    organic = _organic(listed, truth, keys, as_of, end, days, _token(listed, seed))
    events = pd.concat([message_events, organic], ignore_index=True).sort_values(["event_at", "event_id"])
    for c in ("sent_at", "opened_at", "recommended_at"):  # the contract's precision (and the database's)
        exposures[c] = exposures[c].dt.floor("us")
    return Responses(exposures=exposures, events=_typed_events(events.reset_index(drop=True)), as_of=as_of, end=end,
                     listed=len(listed), treated=int(acting.sum()), holdout=int(listed["holdout"].sum()),
                     expected_message_conversions=expected, organic_orders=len(organic))


def _token(listed: pd.DataFrame, seed: int) -> str:
    as_of = listed["as_of"].iloc[0]
    ids = hashlib.blake2b(f"{as_of.isoformat()}\x1f{seed}".encode(), digest_size=6).hexdigest()
    return ids


def _messages(rows: pd.DataFrame, truth: pd.DataFrame, keys: np.ndarray, as_of: pd.Timestamp, end: pd.Timestamp,
              effect: str, send_at_recommended: float) -> tuple[pd.DataFrame, pd.DataFrame, float]:
    rows = rows.reset_index(drop=True)
    n = len(rows)
    channel = rows["channel"].to_numpy(object)
    recommended = rows["send_at"].fillna(as_of)  # no send-time model: sent at the as-of time
    sent_at = _send_times(rows, recommended, keys, as_of, send_at_recommended)
    in_window = (sent_at < end).to_numpy()
    local_hour = _local_hours(sent_at, rows["timezone"])
    p_open = np.zeros(n)
    for ch in np.unique(channel):
        m = channel == ch
        p_open[m] = true_open_prob(truth[m], ch, local_hour[m])
    mean_h = np.array([w.OPEN_DELAY_H[w.CHANNELS.index(c)] for c in channel])
    delay_h = -mean_h * np.log1p(_uniform(keys, _S_DELAY) * np.expm1(-24 / mean_h))  # as the simulator
    opened_at = sent_at + pd.to_timedelta(delay_h * 3600, unit="s")
    opened = (_uniform(keys, _S_OPEN) < p_open) & in_window & (opened_at < end).to_numpy()
    click_rate = np.array([w.CLICK_RATE[w.CHANNELS.index(c)] for c in channel])
    clicked_at = opened_at + pd.to_timedelta(5 + 295 * _uniform(keys, _S_CLICK_AT), unit="s")
    clicked = opened & (_uniform(keys, _S_CLICK) < click_rate) & (clicked_at < end).to_numpy()
    offer = rows["best_offer"].to_numpy(object)
    p_convert = np.zeros(n)
    for o in pd.unique(offer):
        m = offer == o if o is not None else np.array([x is None for x in offer])
        p_convert[m] = true_conversion_prob(truth[m], o)
    expected = float(p_convert[in_window].sum()) if effect == "real" else 0.0
    t0 = opened_at.where(opened, sent_at)  # an order within a day of the open (or of the send)
    limit = (t0 + _DAY).where(t0 + _DAY < end, end)
    bought_at = t0 + (limit - t0).clip(lower=pd.Timedelta(0)) * _uniform(keys, _S_BUY_AT)
    converted = in_window & (effect == "real") & (_uniform(keys, _S_CONVERT) < p_convert) & (bought_at < end).to_numpy()
    revenue = np.where(converted, _order_values(truth["true_aov"].to_numpy(float), keys, _S_AMOUNT), 0.0)
    exposure_id = rows["exposure_id"].to_numpy(object)
    customer = rows["customer_id"].to_numpy(object)
    exposures = pd.DataFrame({
        "exposure_id": exposure_id, "customer_id": customer, "sent_at": sent_at, "channel": channel,
        "offer_id": offer, "propensity": np.nan, "opened_at": opened_at.where(opened),
        "clicked": clicked, "converted": converted, "revenue": revenue,
        "recommended_at": recommended, "local_hour": local_hour,
    })[in_window].reset_index(drop=True)
    parts = []
    for kind, mask, at, types in (("open", opened, opened_at, OPEN_EVENT), ("click", clicked, clicked_at, CLICK_EVENT)):
        m = mask & np.array([c in types for c in channel])
        parts.append(pd.DataFrame({
            "event_id": [f"fb:{e}:{kind}" for e in exposure_id[m]], "customer_id": customer[m],
            "event_at": at[m].reset_index(drop=True), "event_type": [types[c] for c in channel[m]],
            "channel": channel[m], "amount": np.nan, "offer_id": None}))
    parts.append(pd.DataFrame({
        "event_id": [f"fb:{e}:purchase" for e in exposure_id[converted]], "customer_id": customer[converted],
        "event_at": bought_at[converted].reset_index(drop=True), "event_type": "purchase",
        "channel": channel[converted], "amount": revenue[converted], "offer_id": offer[converted]}))
    return exposures, pd.concat(parts, ignore_index=True), expected


def _send_times(rows: pd.DataFrame, recommended: pd.Series, keys: np.ndarray, as_of: pd.Timestamp,
                share: float) -> pd.Series:
    """``send_at``, or with probability 1 - ``share`` another daytime hour of the same local day."""
    follow = _uniform(keys, _S_FOLLOW) < share
    out = recommended.copy()
    if follow.all():
        return out
    # Another daytime hour, uniformly: among the other 12 when the recommended hour is one of the 13.
    rec_hour = _local_hours(recommended, rows["timezone"])
    hours = np.array(DAYTIME_HOURS)
    pos = np.searchsorted(hours, rec_hour)
    inside = (pos < len(hours)) & (hours[np.minimum(pos, len(hours) - 1)] == rec_hour)
    pick = np.floor(_uniform(keys, _S_HOUR) * (len(hours) - inside)).astype(int)
    alt_hour = hours[pick + (inside & (pick >= pos))]
    for tz, idx in rows.groupby(rows["timezone"].fillna("UTC")).groups.items():
        m = np.asarray(idx)
        m = m[~follow[m]]
        if len(m) == 0:
            continue
        local = recommended.iloc[m].dt.tz_convert(tz).dt.tz_localize(None).dt.normalize()
        alt = (local + pd.to_timedelta(alt_hour[m], unit="h")).dt.tz_localize(
            tz, nonexistent="shift_forward", ambiguous=False).dt.tz_convert("UTC")
        alt = alt.where(alt >= as_of, alt + _DAY)
        out.iloc[m] = alt.to_numpy()
    return out


def _local_hours(at: pd.Series, timezones: pd.Series) -> np.ndarray:
    hours = np.zeros(len(at), dtype=np.int64)
    tzs = timezones.fillna("UTC").to_numpy(object)
    for tz in pd.unique(tzs):
        m = tzs == tz
        hours[m] = at[m].dt.tz_convert(tz).dt.hour.to_numpy()
    return hours


def _organic(listed: pd.DataFrame, truth: pd.DataFrame, keys: np.ndarray, as_of: pd.Timestamp,
             end: pd.Timestamp, days: int, token: str) -> pd.DataFrame:
    """Everybody's organic orders in [as_of, end): Poisson at ``organic_purchase_rate`` per day."""
    rate = truth["organic_purchase_rate"].fillna(0.0).to_numpy(float) * days
    counts = _poisson(rate, _uniform(keys, _S_ORGANIC))
    who = np.repeat(np.arange(len(listed)), counts)
    k = np.concatenate([np.arange(c) for c in counts]) if len(who) else np.zeros(0, dtype=np.int64)
    kk, base = keys[who], 32 + 4 * k
    at = as_of + pd.to_timedelta(_uniform(kk, base) * (end - as_of).total_seconds(), unit="s")
    store = _uniform(kk, base + 1) < STORE_SHARE
    customer = listed["customer_id"].to_numpy(object)[who]
    return pd.DataFrame({
        "event_id": [f"rsp:{token}:{c}:{i}" for c, i in zip(customer, k, strict=True)], "customer_id": customer,
        "event_at": at, "event_type": "purchase", "channel": np.where(store, "store", "web"),
        "amount": _order_values(truth["true_aov"].to_numpy(float)[who], kk, base + 2), "offer_id": None})


def _typed_events(events: pd.DataFrame) -> pd.DataFrame:
    events["event_at"] = pd.to_datetime(events["event_at"], utc=True).dt.floor("us").astype("datetime64[us, UTC]")
    events["amount"] = events["amount"].astype("float64")
    for c in ("event_id", "customer_id", "event_type", "channel", "offer_id"):
        events[c] = events[c].astype(object).where(events[c].notna(), None)
    return events


# -- outputs ---------------------------------------------------------------------------------------------

CONTRACT_EXPOSURES = ["exposure_id", "customer_id", "sent_at", "channel", "offer_id", "propensity", "opened_at",
                      "clicked", "converted", "revenue"]


def default_out(list_path: Path) -> Path:
    list_path = Path(list_path)
    return list_path.with_name(f"{list_path.stem}.responses")


def write_contract(responses: Responses, out: Path, *, overwrite: bool = False) -> dict[str, Path]:
    """``customers`` (empty), ``exposures`` and ``events`` Parquet files in ``out``, written to a temporary
    folder beside it and renamed, so a failed run leaves nothing that looks complete."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise RespondError(f"{out} already exists: pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pd.DataFrame({"customer_id": pd.Series([], dtype=object),
                      "signup_at": pd.Series([], dtype="datetime64[us, UTC]")}).to_parquet(
            tmp / "customers.parquet", index=False)
        exposures = responses.exposures[CONTRACT_EXPOSURES].copy()
        for c in ("sent_at", "opened_at"):
            exposures[c] = pd.to_datetime(exposures[c], utc=True).astype("datetime64[us, UTC]")
        exposures.to_parquet(tmp / "exposures.parquet", index=False)
        responses.events.to_parquet(tmp / "events.parquet", index=False)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {name: out / f"{name}.parquet" for name in ("customers", "exposures", "events")}


def check_logged(engine, exposure_ids: Sequence[str]) -> None:
    """Every exposure must be in the decision log, or feedback on it would be refused: say so before posting."""
    import sqlalchemy as sa

    from serving.servingdb import decisions

    ids, found = list(exposure_ids), set()
    with engine.connect() as con:
        for i in range(0, len(ids), 500):
            query = sa.select(decisions.c.exposure_id).where(decisions.c.exposure_id.in_(ids[i:i + 500]))
            found.update(r[0] for r in con.execute(query))
    lost = [e for e in ids if e not in found]
    if lost:
        where = engine.url.render_as_string(hide_password=True)
        raise RespondError(f"{len(lost):,} of the list's {len(ids):,} exposure ids are not in the decision log "
                           f"({where}; e.g. {lost[0]}): score the list with this serving database "
                           "(ENGAGE_SERVING_DB_URL), or pass --no-feedback")


def post_feedback(exposures: pd.DataFrame, engine, on_progress: Callable[[int], None] | None = None) -> int:
    """One feedback per message through :class:`~serving.feedback.FeedbackStore`; returns how many were stored
    or already there (posting the same responses again changes nothing)."""
    from serving.feedback import Feedback, FeedbackStore

    store = FeedbackStore(engine)
    posted = 0
    for r in exposures.itertuples(index=False):
        opened_at = None if pd.isna(r.opened_at) else pd.Timestamp(r.opened_at).to_pydatetime()
        store.record(Feedback(
            exposure_id=r.exposure_id, customer_id=r.customer_id, sent=True,
            sent_at=pd.Timestamp(r.sent_at).to_pydatetime(), opened=opened_at is not None, opened_at=opened_at,
            clicked=bool(r.clicked), converted=bool(r.converted), revenue=float(r.revenue), channel=r.channel,
            offer_id=r.offer_id))
        posted += 1
        if on_progress:
            on_progress(1)
    return posted


def respond(list_path: Path, truth_path: Path, *, out: Path | None = None, days: int = 7, seed: int = 0,
            effect: str = "real", send_at_recommended: float = 0.8, engine=None, overwrite: bool = False,
            post: bool = True, on_progress: Callable[[int], None] | None = None) -> RespondResult:
    """Read, simulate, write the contract files, and (with ``engine``) post the feedback.

    With an ``engine``, every exposure must already be in its decision log (checked before anything is
    written); ``post=False`` leaves the posting to the caller (:func:`post_feedback`).
    """
    check_options(days, effect, send_at_recommended)
    listed = load_list(list_path)
    truth = load_truth(truth_path)
    match_truth(listed, truth)
    out = Path(out) if out is not None else default_out(list_path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise RespondError(f"{out} already exists: pass --overwrite to replace it")
    responses = simulate_responses(listed, truth, days=days, seed=seed, effect=effect,
                                   send_at_recommended=send_at_recommended)
    if engine is not None:
        check_logged(engine, responses.exposures["exposure_id"].tolist())
    files = write_contract(responses, out, overwrite=overwrite)
    posted = post_feedback(responses.exposures, engine, on_progress) if engine is not None and post else None
    return RespondResult(out, files, responses, posted)
