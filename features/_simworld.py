"""The latent world behind the simulator: traits, daily rates, the state process, ground truth.

Everything here is a pure function of numpy arrays (plus an explicit ``Generator``); the
public module ``features.simulate`` only orchestrates chunks and writes files.

Time runs in simulation days: day ``d`` is the 24 hours starting at ``start + d`` days (UTC).
A customer's state (alive, upset, consent per channel) is fixed within a day and changes only
at the day's end, and every random draw of a day is independent given that state. The world
is built so that this chain factorizes: tickets and spontaneous complaints drive the
upset/alive chain, while a message's unsubscribe or spam complaint only ends consent on its
own channel. That is why the ground truth (``no_purchase_probability``) is exact, computed
by a forward recursion in a few vector operations per day rather than by sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

CHANNELS = ("email", "sms", "push", "in_app")  # the first three need an opt-in; in_app a live app user
EVENT_TYPES = ("purchase", "session", "page_view", "email_open", "email_click", "push_open",
               "sms_click", "support_ticket", "complaint", "unsubscribe")
# The first four codes coincide with CHANNELS, so a message's channel index is its event channel.
EVENT_CHANNELS = ("email", "sms", "push", "in_app", "web", "phone", "store")
IN_APP, WEB, PHONE, STORE = 3, 4, 5, 6

TIMEZONES = ("America/New_York", "America/Los_Angeles", "Europe/London", "Europe/Berlin",
             "Asia/Tokyo", "Australia/Sydney", "Asia/Kolkata", "UTC")
TZ_COUNTRY = ("US", "US", "GB", "DE", "JP", "AU", "IN", None)  # UTC: country unknown
TZ_WEIGHTS = np.array([0.24, 0.14, 0.14, 0.14, 0.10, 0.08, 0.10, 0.06])
AGE_BANDS = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")
RESPONSE_TYPES = ("sure_thing", "persuadable", "lost_cause", "sleeping_dog")

# offer_id, name, kind, cost, channels, segments
OFFER_CATALOG = (
    ("OFF10", "10% off the next order", "discount", 6.0, "", ""),
    ("OFF20", "20% off the next order", "discount", 12.0, "", ""),
    ("FREESHIP", "Free shipping", "free_shipping", 4.0, "", ""),
    ("PTS2X", "Double loyalty points", "points", 2.0, "", ""),
    ("GUIDE", "Seasonal style guide", "content", 0.0, "email;push;in_app", ""),
)
OFFER_IDS = tuple(row[0] for row in OFFER_CATALOG)
N_ARMS = 1 + len(OFFER_IDS)  # arm 0 is the control: a message without an offer

DAY_US = 86_400_000_000
NEW_CUSTOMER_DAYS = 90  # the logging policy treats younger customers as "new"

# Per channel (CHANNELS order).
SEND_RATE = np.array([0.024, 0.007, 0.012, 0.008])  # messages per eligible customer-day
OPEN_PEAK = np.array([0.35, 0.60, 0.18, 0.50])  # open prob at the preferred hour, engaged
CLICK_RATE = np.array([0.25, 0.15, 0.30, 0.30])  # P(click | open)
OPEN_DELAY_H = np.array([3.0, 0.5, 0.3, 0.05])  # mean hours from send to open
UNSUB_PER_MSG = np.array([0.004, 0.010, 0.005, 0.0])
COMPLAINT_PER_MSG = np.array([0.0008, 0.0015, 0.0003, 0.0])
LATE_OPEN_SHARE = np.array([0.05, 0.02, 0.02, 0.0])  # opens after 24 h, relative to p_open
HOUR_FLOOR = 0.25  # open prob far from the preferred hour, relative to the peak
DEAD_OPEN_FACTOR = 0.25  # churned customers still open some mail

TICKET_RATE = 0.0008  # per alive customer-day, scaled by complaint proneness and engagement
SPONTANEOUS_COMPLAINT_RATE = 0.00004
UPSET_HAZARD_MULT = 4.0  # hazard multiplier after a ticket or complaint
UPSET_RECOVERY = 1.0 / 30.0  # daily chance an upset customer calms down
ENGAGEMENT_HAZARD_SLOPE = 2.5
DEAD_PAGE_VIEW_RATE = 0.004
ORDER_SIGMA = 0.45  # lognormal sigma of one customer's order values
# Traits that show in behaviour, as they do in real shops (see ``draw_traits``):
BROWSE_BUY_CORRELATION = 0.6  # of log session rate with log purchase rate: frequent buyers visit more
CODE_USE_MAX = 0.4  # share of organic orders with a discount code at price sensitivity 1 (x sensitivity^2)
DISCOUNT_CODES = (0, 1)  # offer indices (OFF10, OFF20) that circulate as codes outside the campaigns

# Persuadables' appetite per offer: intercept + slope * price sensitivity + loyalty bonus.
AFFINITY_INTERCEPT = np.array([0.45, 0.50, 1.00, 0.30, 0.50])
AFFINITY_SENSITIVITY = np.array([0.90, 1.50, -0.60, 0.20, -0.40])
AFFINITY_LOYALTY = np.array([0.00, 0.00, 0.00, 0.90, 0.00])
# Conversion multiplier by response type (sure, persuadable, lost, sleeping dog).
CONTROL_MULT = np.array([1.0, 0.1, 0.0, 1.0])
OFFER_MULT = np.array([1.0, np.nan, 0.0, 0.3])  # persuadables use the affinity instead


def _policy_table() -> np.ndarray:
    """Logging-policy probabilities indexed [loyalty_member, is_new, channel, arm].

    A softmax over arms whose logits depend on observed attributes only, so that the
    propensity of every logged choice is known exactly and off-policy evaluation works.
    """
    base = np.array([0.9, 0.3, -0.6, 0.1, -0.4, 0.0])
    loyal = np.array([0.0, -0.2, -0.4, 0.0, 1.2, 0.0])
    new = np.array([-0.3, 0.8, 0.0, 0.4, -0.5, 0.6])
    channel = np.array([[0.0, 0.0, 0.0, 0.0, 0.0, 0.3],
                        [0.2, 0.3, 0.1, 0.0, 0.0, 0.0],
                        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                        [0.0, -0.2, -0.3, 0.0, 0.3, 0.4]])
    allowed = np.ones((len(CHANNELS), N_ARMS), dtype=bool)
    for arm, row in enumerate(OFFER_CATALOG, start=1):
        if row[4]:
            allowed[:, arm] = [c in row[4].split(";") for c in CHANNELS]
    logits = (base + loyal[None, None, None] * np.arange(2)[:, None, None, None]
              + new[None, None, None] * np.arange(2)[None, :, None, None]
              + channel[None, None])
    logits = np.where(allowed[None, None], logits, -np.inf)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return probs / probs.sum(axis=-1, keepdims=True)


POLICY_PROBS = _policy_table()


def policy_probs(loyalty_member: np.ndarray, is_new: np.ndarray, channel: np.ndarray) -> np.ndarray:
    """Probabilities the logging policy gives each arm (control + offers), shape (n, N_ARMS)."""
    return POLICY_PROBS[np.asarray(loyalty_member, dtype=np.intp), np.asarray(is_new, dtype=np.intp),
                        np.asarray(channel, dtype=np.intp)]


@dataclass(frozen=True)
class Calendar:
    """Per-day multipliers and exact UTC offsets for a run.

    Attributes:
        start_us: epoch microseconds of ``start``.
        n_days: days covered by the arrays (window plus any horizon past it).
        purchase, session, conversion: per-day rate multipliers (season x weekday).
        day_offset_s: [timezone, day] UTC offset in seconds at the day's midpoint.
        tz_keys, tz_offsets: sorted transition keys ``tz * 2**52 + (t_us - base_us)`` and the
            offsets valid from each key on, for exact lookups at any instant.
    """

    start_us: int
    base_us: int
    n_days: int
    purchase: np.ndarray
    session: np.ndarray
    conversion: np.ndarray
    day_offset_s: np.ndarray
    tz_keys: np.ndarray
    tz_offsets: np.ndarray


def build_calendar(start: pd.Timestamp, n_days: int) -> Calendar:
    """Season, weekday and time-zone tables for ``n_days`` days from ``start`` (UTC)."""
    day_starts = start + pd.to_timedelta(np.arange(n_days), unit="D")
    doy = day_starts.dayofyear.to_numpy().astype(float)
    weekend = day_starts.dayofweek.to_numpy() >= 5
    # Black-Friday week and the run-up to Christmas.
    holiday = np.exp(-0.5 * ((doy - 332) / 10) ** 2) + 0.8 * np.exp(-0.5 * ((doy - 354) / 6) ** 2)
    purchase = (1 + 0.9 * holiday) * np.where(weekend, 1.25, 0.9)
    session = (1 + 0.3 * holiday) * np.where(weekend, 1.2, 0.92)
    conversion = 1 + 0.3 * holiday

    # Offsets on a 15-minute grid aligned to UTC catch every real transition exactly
    # (they all happen on the hour or half hour UTC); only the change points are kept.
    base = start.floor("D") - pd.Timedelta(days=2)
    grid = pd.date_range(base, start + pd.Timedelta(days=n_days + 3), freq="15min")
    grid_us = grid.as_unit("us").asi8
    base_us = int(grid_us[0])
    keys, offsets = [], []
    for tz_index, tz in enumerate(TIMEZONES):
        local = grid.tz_convert(tz).tz_localize(None)
        off = ((local - grid.tz_localize(None)).total_seconds()).to_numpy().astype(np.int64)
        change = np.flatnonzero(np.r_[True, off[1:] != off[:-1]])
        keys.append(tz_index * 2**52 + (grid_us[change] - base_us))
        offsets.append(off[change])
    tz_keys, tz_offsets = np.concatenate(keys), np.concatenate(offsets)
    start_us = int(start.value // 1000)
    mid_us = start_us + np.arange(n_days) * DAY_US + DAY_US // 2
    day_offset = np.stack([
        _lookup_offset(tz_keys, tz_offsets, base_us, np.full(n_days, k), mid_us)
        for k in range(len(TIMEZONES))])
    return Calendar(start_us, base_us, n_days, purchase, session, conversion, day_offset,
                    tz_keys, tz_offsets)


SHIFT_KINDS = ("purchases", "engagement")


def shift_calendar(cal: Calendar, from_day: int, kind: str, factor: float = 0.5) -> Calendar:
    """The calendar with a behaviour change for everyone from ``from_day`` on: a drift to detect.

    ``purchases`` scales organic purchase rates by ``factor``; ``engagement`` scales sessions (and the page
    views they bring), organic purchases and message conversions. Only the per-day multipliers change, so
    the ground truth, which reads the same calendar, stays exact.
    """
    if kind not in SHIFT_KINDS:
        raise ValueError(f"shift {kind!r} is not one of {', '.join(SHIFT_KINDS)}")
    scale = np.where(np.arange(cal.n_days) >= from_day, factor, 1.0)
    changed = {"purchase": cal.purchase * scale}
    if kind == "engagement":
        changed |= {"session": cal.session * scale, "conversion": cal.conversion * scale}
    return replace(cal, **changed)


def _lookup_offset(keys: np.ndarray, offsets: np.ndarray, base_us: int, tz: np.ndarray,
                   t_us: np.ndarray) -> np.ndarray:
    pos = np.searchsorted(keys, tz.astype(np.int64) * 2**52 + (t_us - base_us), side="right") - 1
    return offsets[pos]


def local_hour(cal: Calendar, tz: np.ndarray, t_us: np.ndarray) -> np.ndarray:
    """Local clock hour (0-23) of UTC instants, with the offset in force at that instant."""
    off = _lookup_offset(cal.tz_keys, cal.tz_offsets, cal.base_us, tz, t_us)
    return ((t_us // 1_000_000 + off) % 86_400) // 3_600


def local_to_utc(cal: Calendar, tz: np.ndarray, day: np.ndarray, local_s: np.ndarray) -> np.ndarray:
    """UTC microseconds inside simulation day ``day`` whose local clock reads ``local_s``.

    The result always lies strictly inside the day, so a day's events never leak into the
    next one (which keeps the ground truth exact at the truth_at boundary).
    """
    start_tod = (cal.start_us // 1_000_000) % 86_400
    rel = np.mod(local_s - cal.day_offset_s[tz, day] - start_tod, 86_400.0)
    rel_us = np.clip(np.floor(rel * 1e6).astype(np.int64), 1, DAY_US - 1)
    return cal.start_us + day.astype(np.int64) * DAY_US + rel_us


@dataclass(frozen=True)
class Traits:
    """Observed profile and latent traits of a chunk of customers (one entry per customer)."""

    tz: np.ndarray
    signup_us: np.ndarray
    first_day: np.ndarray  # first simulation day on which the customer is active
    age_band: np.ndarray
    household_size: np.ndarray
    loyal: np.ndarray
    consent0: np.ndarray  # (n, 3) opt-ins at signup
    alive0: np.ndarray
    eng0: np.ndarray
    decay: np.ndarray
    onset: np.ndarray
    purchase_rate: np.ndarray  # organic purchases per active day at full engagement
    session_rate: np.ndarray
    page_views_per_session: np.ndarray
    aov_mu: np.ndarray
    sensitivity: np.ndarray
    response: np.ndarray
    arm_mult: np.ndarray  # (n, N_ARMS)
    conv_base: np.ndarray
    proneness: np.ndarray
    h0: np.ndarray
    pref_hour: np.ndarray  # (n, 4)
    open_width: np.ndarray  # (n, 4)
    open_rho: np.ndarray  # (n, 4)
    click_p: np.ndarray  # (n, 4)
    send_rate: np.ndarray  # (n, 4)
    unsub_p: np.ndarray  # (n, 4)
    complaint_p: np.ndarray  # (n, 4)


def draw_traits(rng: np.random.Generator, n: int, days: int, start_us: int) -> Traits:
    """Draw a chunk of customers: who they are, and what drives their behaviour."""
    tz = rng.choice(len(TIMEZONES), size=n, p=TZ_WEIGHTS)
    existing = rng.random(n) < 0.7
    offset_s = np.where(existing, -rng.uniform(60, 3 * 365 * 86_400, n), rng.uniform(0, days * 86_400, n))
    signup_us = start_us + np.floor(offset_s * 1e6).astype(np.int64)
    # New customers become active the day after signup (the signup itself gets a session).
    first_day = np.where(existing, 0, np.floor(offset_s / 86_400).astype(np.int64) + 1)
    tenure0 = np.maximum(-offset_s / 86_400, 0)
    age = rng.choice(len(AGE_BANDS), size=n, p=[0.12, 0.24, 0.22, 0.18, 0.14, 0.10])
    household = np.minimum(1 + rng.poisson(1.4, n), 8)
    loyal = rng.random(n) < np.where(existing, 0.12 + 0.25 * np.minimum(tenure0 / 1095, 1), 0.10)
    consent0 = np.stack([rng.random(n) < 0.9,
                         rng.random(n) < 0.40 + 0.06 * age,
                         rng.random(n) < 0.85 - 0.07 * age], axis=1)
    eng0 = rng.beta(2.5, 2.0, n)
    decliner = rng.random(n) < 0.3
    decay = np.where(decliner, rng.uniform(0.004, 0.02, n), 0.0)
    onset = np.where(existing, rng.uniform(-60, days, n), first_day + rng.uniform(0, days, n))
    sensitivity = rng.beta(2, 2, n)
    p_persuadable = 0.2 + 0.3 * sensitivity
    u = rng.random(n)
    response = np.select([u < 0.2, u < 0.2 + p_persuadable, u < 0.92], [0, 1, 2], 3)
    h0 = rng.lognormal(np.log(0.0006) - 0.18, 0.6, n)
    alive0 = ~existing | (rng.random(n) < np.exp(-0.5 * base_hazard(h0, eng0) * tenure0))

    centre = np.stack([np.where(rng.random(n) < 0.55, 8.0, 20.0), np.full(n, 12.5),
                       np.full(n, 19.5), np.full(n, 20.0)], axis=1)
    spread = np.array([1.0, 2.0, 1.5, 2.0])
    # Kept inside the 06-22 send window, so every best hour is one the campaign log samples.
    pref = np.clip(np.rint(centre + spread * rng.standard_normal((n, 4))), 7, 21).astype(np.int64)
    send_mult = np.where(loyal, 1.3, 1.0)[:, None]  # marketing writes more to loyalty members
    prone = np.clip(rng.lognormal(-0.32, 0.8, n), 0.05, 8.0)
    # Browsing and buying share a customer factor: the session rate keeps its lognormal marginal but its
    # log is correlated with the log purchase rate.
    mu_p, mu_s = np.log(6.0 / 365) - 0.32, np.log(40.0 / 365) - 0.18
    purchase_rate = rng.lognormal(mu_p, 0.8, n)
    own_browse = (np.log(rng.lognormal(mu_s, 0.6, n)) - mu_s) / 0.6
    z = BROWSE_BUY_CORRELATION * (np.log(purchase_rate) - mu_p) / 0.8
    session_rate = np.exp(mu_s + 0.6 * (z + np.sqrt(1 - BROWSE_BUY_CORRELATION**2) * own_browse))
    page_views = rng.uniform(0.2, 1.4, n)
    aov_mu = rng.normal(np.log(50.0), 0.35, n)
    return Traits(
        tz=tz, signup_us=signup_us, first_day=first_day, age_band=age, household_size=household,
        loyal=loyal, consent0=consent0, alive0=alive0, eng0=eng0, decay=decay, onset=onset,
        purchase_rate=purchase_rate, session_rate=session_rate, page_views_per_session=page_views,
        aov_mu=aov_mu, sensitivity=sensitivity, response=response,
        arm_mult=arm_multipliers(response, sensitivity, loyal),
        conv_base=rng.uniform(0.04, 0.15, n), proneness=prone, h0=h0, pref_hour=pref,
        open_width=rng.uniform(1.5, 3.0, (n, 4)), open_rho=rng.uniform(0.5, 1.5, (n, 4)),
        click_p=np.clip(CLICK_RATE * rng.uniform(0.5, 1.5, (n, 4)), 0, 0.9),
        send_rate=np.clip(SEND_RATE * send_mult, 0, 1),
        unsub_p=np.clip(UNSUB_PER_MSG * prone[:, None], 0, 0.3),
        complaint_p=np.clip(COMPLAINT_PER_MSG * prone[:, None], 0, 0.1),
    )


# ---- rates: pure functions, shared by the simulation and the ground truth ----------------

def engagement(eng0, decay, onset, day):
    """Engagement in (0, 1]: constant, or decaying exponentially from the onset day on."""
    return eng0 * np.exp(-decay * np.maximum(0.0, day - onset))


def base_hazard(h0, eng):
    """Daily churn hazard of a calm customer; low engagement raises it."""
    return h0 * np.exp(ENGAGEMENT_HAZARD_SLOPE * (0.5 - eng))


def purchase_intensity(eng, season):
    """Organic purchases per day per unit of the customer's purchase rate."""
    return (0.3 + 0.7 * eng) * season


def ticket_prob(eng, proneness):
    return 1 - np.exp(-TICKET_RATE * (0.5 + 0.5 * proneness) * (0.5 + eng))


def spontaneous_complaint_prob(proneness):
    return 1 - np.exp(-SPONTANEOUS_COMPLAINT_RATE * proneness)


def open_peak(rho, eng, alive, channel):
    """P(open within 24 h) when sent at the preferred local hour."""
    peak = OPEN_PEAK[channel] * rho * (0.3 + 0.7 * eng) * np.where(alive, 1.0, DEAD_OPEN_FACTOR)
    return np.clip(peak, 0.0, 0.95)


def open_probability(base, pref_hour, width, hour):
    """P(open within 24 h) at a local send hour: a bump around the preferred hour."""
    dist = np.abs(np.asarray(hour) - pref_hour) % 24
    dist = np.minimum(dist, 24 - dist)
    return base * (HOUR_FLOOR + (1 - HOUR_FLOOR) * np.exp(-0.5 * (dist / width) ** 2))


def arm_multipliers(response, sensitivity, loyal) -> np.ndarray:
    """How each arm scales a customer's conversion level, (n, N_ARMS); fixed per customer.

    Sure things convert alike with or without an offer, persuadables mostly only with one
    (more with the kinds that fit their price sensitivity and loyalty), lost causes never,
    and sleeping dogs less when they get an offer.
    """
    affinity = (AFFINITY_INTERCEPT + AFFINITY_SENSITIVITY * sensitivity[:, None]
                + AFFINITY_LOYALTY * np.asarray(loyal, dtype=float)[:, None])
    out = np.empty((len(response), N_ARMS))
    out[:, 0] = CONTROL_MULT[response]
    out[:, 1:] = np.where((response == 1)[:, None], affinity, OFFER_MULT[response][:, None])
    return out


def conversion_probs(arm_mult, conv_base, eng, season, alive) -> np.ndarray:
    """P(convert) per arm (control first, then OFFER_IDS) for one message, (n, N_ARMS).

    Linear in the customer's level, and never above 2.0 * 0.15 * 1.0 * 1.3 < 1 (largest
    multiplier, base, engagement and season), so no clipping is needed; the ground truth
    relies on that linearity.
    """
    return arm_mult * conversion_level(conv_base, eng, season, alive)[:, None]


def conversion_level(conv_base, eng, season, alive):
    return conv_base * (0.4 + 0.6 * eng) * season * np.asarray(alive, dtype=float)


def is_new(cal: Calendar, signup_us, day):
    """Whether the customer counts as new for the logging policy on that day (observable)."""
    return (cal.start_us + np.asarray(day, dtype=np.int64) * DAY_US - signup_us) < NEW_CUSTOMER_DAYS * DAY_US


def policy_weighted_multipliers(tr: Traits) -> tuple[np.ndarray, np.ndarray]:
    """Expected arm multiplier of one message under the logging policy, per channel.

    Returns:
        (established, new): each (n, 4); the policy's context is the customer's loyalty
        membership and whether they are new, so these two cover every day.
    """
    by_context = (tr.arm_mult @ POLICY_PROBS.reshape(-1, N_ARMS).T).reshape(len(tr.tz), 4, len(CHANNELS))
    rows = np.arange(len(tr.tz))
    return by_context[rows, 2 * tr.loyal], by_context[rows, 2 * tr.loyal + 1]


class _DailyRates:
    """Engagement-driven daily rates of a chunk, recomputed only where engagement decays.

    About 70 % of customers keep a constant engagement; skipping their exponentials
    halves the cost of the day loops.
    """

    def __init__(self, tr: Traits) -> None:
        self.idx = np.flatnonzero(tr.decay > 0)
        self._eng0, self._decay, self._onset = tr.eng0[self.idx], tr.decay[self.idx], tr.onset[self.idx]
        self._h0, self._prone = tr.h0[self.idx], tr.proneness[self.idx]
        self.eng = tr.eng0.copy()
        self.hazard = base_hazard(tr.h0, self.eng)  # of a calm customer
        self.ticket = ticket_prob(self.eng, tr.proneness)

    def update(self, day: int) -> None:
        eng = engagement(self._eng0, self._decay, self._onset, day)
        self.eng[self.idx] = eng
        self.hazard[self.idx] = base_hazard(self._h0, eng)
        self.ticket[self.idx] = ticket_prob(eng, self._prone)


# ---- the state process -------------------------------------------------------------------

@dataclass(frozen=True)
class StateLog:
    """What the day-by-day state process produced for a chunk.

    Attributes:
        death_day: first day the customer is dead (0 if dead at start, a large number if
            alive at the end of the window).
        messages: dict of arrays, one entry per message sent: customer, day, channel, alive
            (at the start of that day), unsub, complaint.
        tickets, complaints: (customer, day) of support tickets and spontaneous complaints.
        truth_alive, truth_upset, truth_consent: the state at the start of the truth day.
        final_consent: (n, 3) consent after the last day.
    """

    death_day: np.ndarray
    messages: dict[str, np.ndarray]
    tickets: tuple[np.ndarray, np.ndarray]
    complaints: tuple[np.ndarray, np.ndarray]
    truth_alive: np.ndarray
    truth_upset: np.ndarray
    truth_consent: np.ndarray
    final_consent: np.ndarray


NEVER = np.iinfo(np.int32).max


def bernoulli_days(rng: np.random.Generator, p: np.ndarray, n_days: int) -> tuple[np.ndarray, np.ndarray]:
    """Every success of independent daily Bernoulli(p[i]) trials on days [0, n_days).

    Drawn as geometric gaps, a few vector operations per success instead of one random
    number per day. Returns (i, day), sorted by day (ties in index order).
    """
    idx = np.flatnonzero(p > 0)
    day = rng.geometric(p[idx]) - 1
    found_i, found_day = [idx[:0]], [day[:0]]
    while len(idx):
        keep = day < n_days
        idx, day = idx[keep], day[keep]
        found_i.append(idx)
        found_day.append(day)
        day = day + rng.geometric(p[idx])
    i, day = np.concatenate(found_i), np.concatenate(found_day)
    order = np.lexsort((i, day))
    return i[order], day[order]


def _day_bounds(day: np.ndarray, n_days: int) -> np.ndarray:
    return np.searchsorted(day, np.arange(n_days + 1))


def run_state_process(rng: np.random.Generator, tr: Traits, n_days: int, truth_day: int) -> StateLog:
    """Step the alive / upset / consent state of every customer through the window.

    Whatever can happen regardless of the state is drawn up front as daily Bernoulli
    processes: send attempts per channel with their unsubscribe/complaint outcomes,
    support-ticket candidates (thinned to the day's engagement) and spontaneous
    complaints. The day loop then only gates them by the state of that day (signed up,
    consented, alive) and moves the state: deaths via an exponential clock (it fires on
    day d with probability 1 - exp(-hazard_d), as a daily Bernoulli would), moods, consent.
    Opens, purchases, sessions and offers do not change the state and are drawn later.
    """
    n = len(tr.tz)
    # Send attempts: flat index = customer * 4 + channel.
    flat, s_day = bernoulli_days(rng, tr.send_rate.ravel(), n_days)
    s_cust, s_chan = flat // 4, flat % 4
    v = rng.random((2, len(flat)))
    s_complaint = v[1] < tr.complaint_p[s_cust, s_chan]
    s_unsub = (v[0] < tr.unsub_p[s_cust, s_chan]) | s_complaint  # a spam complaint unsubscribes
    s_bounds = _day_bounds(s_day, n_days)
    # Tickets: candidates at the highest rate (engagement only decays), thinned per day.
    p_max = ticket_prob(tr.eng0, tr.proneness)
    t_cust, t_day = bernoulli_days(rng, p_max, n_days)
    eng_t = engagement(tr.eng0[t_cust], tr.decay[t_cust], tr.onset[t_cust], t_day)
    keep = rng.random(len(t_cust)) * p_max[t_cust] < ticket_prob(eng_t, tr.proneness[t_cust])
    t_cust, t_day = t_cust[keep], t_day[keep]
    t_bounds = _day_bounds(t_day, n_days)
    c_cust, c_day = bernoulli_days(rng, spontaneous_complaint_prob(tr.proneness), n_days)
    c_bounds = _day_bounds(c_day, n_days)

    alive, upset, consent = tr.alive0.copy(), np.zeros(n, bool), tr.consent0.copy()
    death_day = np.where(alive, NEVER, 0).astype(np.int64)
    hazard_clock, hazard_due = np.zeros(n), rng.exponential(size=n)
    rates = _DailyRates(tr)
    sent, sent_alive, ticket_kept, complaint_kept = [], [], [], []
    truth = None
    for d in range(n_days):
        if d == truth_day:
            truth = (alive.copy(), upset.copy(), consent.copy())
        active = (tr.first_day <= d) & alive
        rates.update(d)
        lo, hi = s_bounds[d], s_bounds[d + 1]
        cust, chan = s_cust[lo:hi], s_chan[lo:hi]
        ok = (tr.first_day[cust] <= d) & np.where(chan < 3, consent[cust, np.minimum(chan, 2)], alive[cust])
        sent.append(ok)
        sent_alive.append(alive[cust])
        tickets = t_cust[t_bounds[d]:t_bounds[d + 1]]
        ticket_kept.append(active[tickets])
        tickets = tickets[ticket_kept[-1]]
        complaints = c_cust[c_bounds[d]:c_bounds[d + 1]]
        complaint_kept.append(active[complaints])
        complaints = complaints[complaint_kept[-1]]
        # End of day: deaths, then mood, then consent.
        hazard_clock += np.where(active, rates.hazard * np.where(upset, UPSET_HAZARD_MULT, 1.0), 0.0)
        died = active & (hazard_clock >= hazard_due)
        death_day[died] = d + 1
        alive &= ~died
        calm_down = np.flatnonzero(upset)
        upset[calm_down[rng.random(len(calm_down)) < UPSET_RECOVERY]] = False
        upset[tickets] = True
        upset[complaints] = True
        upset &= alive
        gone = ok & s_unsub[lo:hi]
        consent[cust[gone], chan[gone]] = False  # in_app never unsubscribes (rate 0)
    if truth is None:  # truth day past the window: the state at its end
        truth = (alive.copy(), upset.copy(), consent.copy())
    ok = np.concatenate(sent)
    t_ok, c_ok = np.concatenate(ticket_kept), np.concatenate(complaint_kept)
    messages = {"customer": s_cust[ok], "day": s_day[ok], "channel": s_chan[ok],
                "alive": np.concatenate(sent_alive)[ok], "unsub": s_unsub[ok], "complaint": s_complaint[ok]}
    return StateLog(
        death_day=death_day, messages=messages, tickets=(t_cust[t_ok], t_day[t_ok]),
        complaints=(c_cust[c_ok], c_day[c_ok]), truth_alive=truth[0], truth_upset=truth[1],
        truth_consent=truth[2], final_consent=consent)


# ---- ground truth -------------------------------------------------------------------------

def no_purchase_probability(tr: Traits, cal: Calendar, truth_day: int, horizon: int,
                            alive: np.ndarray, upset: np.ndarray, consent: np.ndarray) -> np.ndarray:
    """Exact P(no purchase on days [truth_day, truth_day + horizon)) given the state then.

    Given the day T a customer dies, purchases are independent of everything else: organic
    ones are Poisson with a known rate, and each channel converts only while consented,
    where consent is a two-state chain of its own (a message that does not convert may
    still unsubscribe). The death day depends only on the upset/calm chain (tickets and
    spontaneous complaints). Hence

        P(no purchase) = sum_T P(death day = T) * B(T) * prod_c G_c(T)

    with B the organic and in-app no-purchase product over days before T and G_c the
    probability that channel c has not converted before T; all are carried forward day by
    day, so the cost is a few vector operations per horizon day.
    """
    n = len(tr.tz)
    calm_mass = (alive & ~upset).astype(float)
    upset_mass = (alive & upset).astype(float)
    # Channel-major (channel, customer) arrays keep every operation on contiguous memory.
    consented = consent.T.astype(float)  # P(consented, no conversion yet) per channel
    dropped = 1 - consented  # P(opted out, no conversion yet)
    send = np.ascontiguousarray(tr.send_rate.T)
    leave = np.ascontiguousarray(1 - (1 - tr.unsub_p[:, :3].T) * (1 - tr.complaint_p[:, :3].T))
    established, new = (np.ascontiguousarray(m.T) for m in policy_weighted_multipliers(tr))
    no_buy = np.ones(n)
    result = (~alive).astype(float)
    spont = spontaneous_complaint_prob(tr.proneness)
    rates = _DailyRates(tr)
    for d in range(truth_day, truth_day + horizon):
        rates.update(d)
        level = conversion_level(tr.conv_base, rates.eng, cal.conversion[d], True)
        newcomer = is_new(cal, tr.signup_us, d)
        conv = level * (np.where(newcomer, new, established) if newcomer.any() else established)
        no_buy *= np.exp(-tr.purchase_rate * purchase_intensity(rates.eng, cal.purchase[d]))
        no_buy *= 1 - send[3] * conv[3]
        sent_no_buy = send[:3] * (1 - conv[:3])
        dropped += consented * sent_no_buy * leave
        consented *= (1 - send[:3]) + sent_no_buy * (1 - leave)
        calm_survive = np.exp(-rates.hazard)
        upset_survive = np.exp(-rates.hazard * UPSET_HAZARD_MULT)
        die = calm_mass * (1 - calm_survive) + upset_mass * (1 - upset_survive)
        no_conversion = consented + dropped
        result += die * no_buy * no_conversion[0] * no_conversion[1] * no_conversion[2]
        trigger = 1 - (1 - rates.ticket) * (1 - spont)
        calm_mass, upset_mass = (
            (1 - trigger) * (calm_survive * calm_mass + UPSET_RECOVERY * upset_survive * upset_mass),
            trigger * calm_survive * calm_mass
            + (trigger + (1 - trigger) * (1 - UPSET_RECOVERY)) * upset_survive * upset_mass)
    no_conversion = consented + dropped
    result += (calm_mass + upset_mass) * no_buy * no_conversion[0] * no_conversion[1] * no_conversion[2]
    return np.clip(result, 0.0, 1.0)


def sample_activity(rng: np.random.Generator, tr: Traits, first: np.ndarray, end: np.ndarray,
                    intensity, season: np.ndarray, rate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Days of a Poisson process with intensity ``rate * intensity(eng(day), season[day])``.

    Equivalent to one Poisson draw per customer-day on [first, end): the count per customer
    is Poisson with the summed intensity and the days follow the intensity. ``intensity``
    must be linear in ``season``, so customers with constant engagement share one
    cumulative calendar and only those whose engagement decays need a (customer, day) matrix.

    Returns:
        (customer, day) of every event, customers with constant engagement first.
    """
    n_days = len(season)
    has = end > first
    steady = np.flatnonzero(tr.decay == 0)
    cum = np.r_[0.0, np.cumsum(season)]
    span = np.where(has[steady], cum[end[steady]] - cum[first[steady]], 0.0)
    counts = rng.poisson(rate[steady] * intensity(tr.eng0[steady], 1.0) * span)
    cust = np.repeat(steady, counts)
    lo, hi = cum[first[cust]], cum[end[cust]]
    target = lo + rng.random(len(cust)) * (hi - lo)
    day = np.clip(np.searchsorted(cum, target, side="right") - 1, first[cust], end[cust] - 1)

    decl = np.flatnonzero(tr.decay > 0)
    eng = engagement(tr.eng0[decl, None], tr.decay[decl, None], tr.onset[decl, None],
                     np.arange(n_days, dtype=float)[None, :])
    flat = intensity(eng, season[None, :]).ravel()
    del eng
    np.cumsum(flat, out=flat)
    d_rows, d_day = _sample_rows(rng, flat, n_days, first[decl], end[decl], rate[decl])
    return np.concatenate([cust, decl[d_rows]]), np.concatenate([day, d_day])


def _sample_rows(rng: np.random.Generator, cum: np.ndarray, n_days: int, first: np.ndarray,
                 end: np.ndarray, rate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Like ``sample_activity`` for one intensity row per customer.

    Args:
        cum: cumulative sum of the flattened (rows, n_days) intensity matrix, row-major.
    """
    n = len(first)
    row0 = np.arange(n, dtype=np.int64) * n_days

    def cum_at(i):
        return np.where(i >= 0, cum[np.maximum(i, 0)], 0.0)

    has = end > first
    lo = cum_at(row0 + first - 1)
    mass = np.where(has, cum_at(row0 + np.maximum(end, 1) - 1) - lo, 0.0)
    counts = rng.poisson(rate * np.maximum(mass, 0.0))
    rows = np.repeat(np.arange(n), counts)
    target = lo[rows] + rng.random(len(rows)) * mass[rows]
    flat = np.searchsorted(cum, target, side="right")
    day = np.clip(flat - row0[rows], first[rows], end[rows] - 1)
    return rows, day
