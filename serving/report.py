"""`engage report`: what acting on the recommendations realised, measured against the control group.

Inputs, all read-only: the decision log and the feedback (serving database), and the warehouse's purchases,
customers and offers (DuckDB under ENGAGE_HOME; message conversions arrive there through
`engage feedback import` or `engage simulate-respond`, and a converted feedback whose purchase is not loaded
yet is counted from the feedback itself, once).

**Who is compared (intention to treat).** Every customer decided in [since, until) with an action is in
the experiment, assigned at their first such decision: *treated* when the policy acted (``holdout`` false,
``action`` not none) and *holdout* when the policy would have acted but the customer is in the control
group (``holdout`` true, ``intended_action`` not none). Whether the message was then sent, opened or
acted on does not move anybody between groups, so the two groups differ only by the policy's decision --
the comparison is unbiased, and it measures what the *decision* is worth, delivery losses included.

**Outcomes** per customer over the attribution window [decided_at, decided_at + attribution_days): any
purchase (conversion), revenue, offer costs (each purchase redeeming an offer costs the offer's catalog
``cost``), profit = revenue x margin - offer costs (margin from the config). Means per group with 95%
intervals (normal approximation; the groups are hundreds of customers or more), and the treated-minus-
holdout difference with its interval (Welch's standard error). Churn per risk tier is no purchase over
the churn horizon (config ``training.horizon_days``) when the warehouse covers it for every customer, else
over the attribution window; the report says which.

**Per offer**: predicted uplift (the model's P(convert | offer) - P(convert | message without offer), from
the decision payloads) against the realised conversion of the customers who got the offer minus that of
the control-group customers the policy meant it for (all of the control group when fewer than
``MIN_GROUP`` of them). The two are not the same quantity -- the realised one includes the effect of the
message itself -- so the table shows both, and the attributed conversion rate of the messages.

**Send time**: open rate of messages sent in the recommended local hour against those sent in another hour
(local hours in the customer's timezone from the warehouse). **KPIs**: reach (messages sent per treated
decision), open, click and conversion rates per sent message, repurchase rate (of customers with an
earlier purchase, the share who bought again in the window) and churn rate, per group where they apply.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import sqlalchemy as sa

Z95 = 1.959963984540054
MIN_GROUP = 30  # control-group customers per offer below which the whole control group is the comparison
GROUPS = ("treated", "holdout")
TIERS = ("high", "medium", "low", "unknown")
NO_OFFER = "(no offer)"


class ReportError(ValueError):
    """No report can be made (nothing decided yet, no feedback, no control group, bad options)."""


@dataclass(frozen=True)
class Estimate:
    """A mean (or difference of means) with its 95% interval."""

    value: float
    low: float
    high: float
    n: int

    @property
    def verdict(self) -> str:
        if self.low > 0:
            return "positive"
        if self.high < 0:
            return "negative"
        return "no measurable effect"


@dataclass
class Report:
    since: datetime | None
    until: datetime  # the end of the period, or the last decision when none was given
    attribution_days: int
    margin: float
    churn_window: str  # what "churn" means here, in words
    customers: pd.DataFrame  # one row per customer in the experiment, with outcomes
    groups: pd.DataFrame  # per group: customers, conversion, revenue, profit (+ intervals)
    difference: dict[str, Estimate]  # treated minus holdout: conversion, revenue, profit
    tiers: pd.DataFrame
    offers: pd.DataFrame
    send_time: pd.DataFrame
    kpis: pd.DataFrame
    counts: dict[str, int]
    notes: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """Flat numbers for MLflow (finite only)."""
        out: dict[str, float] = {f"customers_{k}": float(v) for k, v in self.counts.items()}
        for g in self.groups.itertuples():
            for name in ("conversion", "revenue", "profit"):
                out[f"{g.group}_{name}_per_customer"] = getattr(g, name)
        for name, e in self.difference.items():
            out |= {f"diff_{name}": e.value, f"diff_{name}_low": e.low, f"diff_{name}_high": e.high}
        for k in self.kpis.itertuples():
            out[f"kpi_{k.kpi.replace(' ', '_')}_{k.group}"] = k.value
        return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(v)}


# -- statistics ------------------------------------------------------------------------------------------


def mean_ci(x: np.ndarray) -> Estimate:
    x = np.asarray(x, dtype=float)
    n = len(x)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    m = float(x.mean())
    se = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return Estimate(m, m - Z95 * se, m + Z95 * se, n)


def diff_ci(a: np.ndarray, b: np.ndarray) -> Estimate:
    """Mean of ``a`` minus mean of ``b`` with Welch's standard error."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return Estimate(math.nan, math.nan, math.nan, len(a) + len(b))
    d = float(a.mean() - b.mean())
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    return Estimate(d, d - Z95 * se, d + Z95 * se, len(a) + len(b))


def rate_ci(successes: int, n: int) -> Estimate:
    """A proportion with its Wilson interval (sound for small counts and rates near 0 or 1)."""
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    p = successes / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return Estimate(p, centre - half, centre + half, n)


# -- reading ---------------------------------------------------------------------------------------------


def load_decisions(engine, since: datetime | None, until: datetime | None) -> pd.DataFrame:
    """Decisions with ``since <= decided_at < until`` (None: open), with the payload fields the report reads."""
    from serving.servingdb import decisions as t

    cols = [t.c[c] for c in ("decision_id", "exposure_id", "customer_id", "decided_at", "source", "action",
                             "reason", "chosen_offer", "channel", "send_at", "holdout", "payload")]
    query = sa.select(*cols)
    if until is not None:
        query = query.where(t.c.decided_at < until)
    if since is not None:
        query = query.where(t.c.decided_at >= since)
    with engine.connect() as con:
        df = pd.DataFrame(con.execute(query.order_by(t.c.decided_at, t.c.decision_id)).mappings().all(),
                          columns=[c.name for c in cols])
    payload = df["payload"].map(lambda p: p if isinstance(p, dict) else {})
    df["holdout"] = df["holdout"].fillna(False).astype(bool)
    df["intended_action"] = payload.map(lambda p: p.get("intended_action"))
    df["risk_tier"] = payload.map(lambda p: p.get("risk_tier") or "unknown")
    df["offer"] = [_offer_of(r.chosen_offer, r.holdout, p) for r, p in zip(df.itertuples(), payload, strict=True)]
    df["predicted_uplift"] = [_uplift_of(o, p) for o, p in zip(df["offer"], payload, strict=True)]
    for c in ("decided_at", "send_at"):
        df[c] = pd.to_datetime(df[c], utc=True)
    return df.drop(columns=["payload"])


def _offer_of(chosen: str | None, holdout: bool, payload: dict) -> str:
    """The offer the customer got (control group: was meant to get); ``NO_OFFER`` for a plain message."""
    if not holdout:
        return chosen or NO_OFFER
    if "intended_offer" in payload:  # batch lists record it
        return payload["intended_offer"] or NO_OFFER
    for o in payload.get("offers") or []:  # API answers: the best eligible offer with positive uplift
        if o.get("eligible", True) and (o.get("uplift") or 0) > 0 and (o.get("priority") or 1) > 0:
            return o["offer_id"]
    return NO_OFFER


def _uplift_of(offer: str, payload: dict) -> float:
    if offer == NO_OFFER:
        return 0.0
    for o in payload.get("offers") or []:
        if o.get("offer_id") == offer and o.get("uplift") is not None:
            return float(o["uplift"])
    return math.nan


def load_feedback(engine, exposure_ids: list[str]) -> pd.DataFrame:
    from serving.servingdb import feedback as t

    cols = ["exposure_id", "customer_id", "channel", "offer_id", "sent", "sent_at", "opened", "opened_at",
            "clicked", "converted", "revenue"]
    rows = []
    with engine.connect() as con:
        for i in range(0, len(exposure_ids), 500):
            query = sa.select(*[t.c[c] for c in cols]).where(t.c.exposure_id.in_(exposure_ids[i:i + 500]))
            rows.extend(con.execute(query).mappings().all())
    df = pd.DataFrame(rows, columns=cols)
    for c in ("sent_at", "opened_at"):
        df[c] = pd.to_datetime(df[c], utc=True)
    return df


@dataclass
class Warehouse:
    purchases: pd.DataFrame  # customer_id, event_id, event_at, amount, offer_id (inside the customers' windows)
    earlier: set[str]  # customers with a purchase before their decision
    timezones: dict[str, str]
    costs: dict[str, float]
    data_end: datetime | None


def load_warehouse(home: Path, windows: pd.DataFrame, horizon_days: int) -> Warehouse:
    """Purchases of ``windows`` (customer_id, start, end) inside [start, end + horizon), and what else the
    report needs, in one read-only DuckDB connection."""
    from features.load import connect_warehouse, warehouse_path

    if not warehouse_path(home).exists():
        raise ReportError(f"no data loaded in {home}: run `engage ingest DIR` first")
    with contextlib.closing(connect_warehouse(home, read_only=True)) as con:
        w = windows[["customer_id", "start", "end"]].copy()
        w["far"] = w["start"] + pd.Timedelta(days=horizon_days)
        for c in ("start", "end", "far"):  # the warehouse keeps naive UTC timestamps
            w[c] = pd.to_datetime(w[c], utc=True).dt.tz_localize(None)
        con.register("report_windows", w)
        purchases = con.execute(
            "SELECT e.customer_id, e.event_id, e.event_at, e.amount, e.offer_id FROM events e "
            "JOIN report_windows w USING (customer_id) WHERE e.event_type = 'purchase' "
            "AND e.event_at >= w.start AND e.event_at < greatest(w.far, w.\"end\")").df()
        earlier = {c for (c,) in con.execute(
            "SELECT DISTINCT e.customer_id FROM events e JOIN report_windows w USING (customer_id) "
            "WHERE e.event_type = 'purchase' AND e.event_at < w.start").fetchall()}
        timezones = dict(con.execute(
            "SELECT c.customer_id, coalesce(c.timezone, 'UTC') FROM customers c "
            "JOIN report_windows w USING (customer_id)").fetchall())
        costs = {o: float(c or 0.0) for o, c in con.execute("SELECT offer_id, cost FROM offers").fetchall()}
        (end,) = con.execute("SELECT max(event_at) FROM events").fetchone()
    purchases["event_at"] = pd.to_datetime(purchases["event_at"], utc=True)
    return Warehouse(purchases, earlier, timezones, costs, None if end is None else _utc(end))


def _utc(value) -> pd.Timestamp:
    stamp = pd.Timestamp(value)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


# -- the analysis ----------------------------------------------------------------------------------------


def assign(decisions: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """One row per customer in the experiment (first decision with an action or intended action), and how
    many customers changed group within the period (a new holdout salt): they keep their first group."""
    treated = ~decisions["holdout"] & (decisions["action"] != "none")
    held = decisions["holdout"] & (decisions["intended_action"].fillna("none") != "none")
    d = decisions[treated | held].copy()
    d["group"] = np.where(d["holdout"], "holdout", "treated")
    switched = int((d.groupby("customer_id")["group"].nunique() > 1).sum())
    return d.drop_duplicates("customer_id", keep="first").reset_index(drop=True), switched


def outcomes(customers: pd.DataFrame, wh: Warehouse, fb: pd.DataFrame, margin: float,
             horizon_days: int) -> tuple[pd.DataFrame, str]:
    """Per customer: converted, revenue, costs, profit in the window; churned (see the module docstring)."""
    p = wh.purchases.merge(customers[["customer_id", "start", "end"]], on="customer_id")
    # Converted feedback whose purchase event is not loaded yet counts from the feedback (once).
    late = fb[fb["converted"].astype(bool) & ~("fb:" + fb["exposure_id"] + ":purchase").isin(wh.purchases["event_id"])]
    if len(late):
        extra = late.assign(event_at=late["opened_at"].fillna(late["sent_at"]), amount=late["revenue"])
        extra = extra[["customer_id", "event_at", "amount", "offer_id"]].merge(
            customers[["customer_id", "start", "end"]], on="customer_id")
        p = pd.concat([p, extra], ignore_index=True)
    p["cost"] = p["offer_id"].map(lambda o: wh.costs.get(o, 0.0) if isinstance(o, str) else 0.0)
    inside = p[(p["event_at"] >= p["start"]) & (p["event_at"] < p["end"])]
    per = inside.groupby("customer_id").agg(orders=("amount", "size"), revenue=("amount", "sum"),
                                            costs=("cost", "sum"))
    out = customers.join(per, on="customer_id")
    out[["orders", "revenue", "costs"]] = out[["orders", "revenue", "costs"]].fillna(0.0)
    out["converted"] = (out["orders"] > 0).astype(float)
    out["profit"] = out["revenue"] * margin - out["costs"]
    far = out["start"] + pd.Timedelta(days=horizon_days)
    if wh.data_end is not None and bool((far <= wh.data_end).all()):
        bought = p[p["event_at"] < p["start"] + pd.Timedelta(days=horizon_days)]["customer_id"].unique()
        out["churned"] = (~out["customer_id"].isin(bought)).astype(float)
        return out, f"no purchase in the {horizon_days}-day churn horizon after the decision"
    out["churned"] = 1.0 - out["converted"]
    return out, (f"no purchase in the {int((out['end'] - out['start']).iloc[0] / pd.Timedelta(days=1))}-day "
                 f"attribution window (the {horizon_days}-day churn horizon is not covered by the data yet)")


def analyse(decisions: pd.DataFrame, fb: pd.DataFrame, wh: Warehouse, customers: pd.DataFrame, *, margin: float,
            horizon_days: int, attribution_days: int, since: datetime | None, until: datetime,
            counts: dict[str, int], notes: list[str]) -> Report:
    out, churn_window = outcomes(customers, wh, fb, margin, horizon_days)
    g = {name: out[out["group"] == name] for name in GROUPS}
    rows = []
    for name, part in g.items():
        row = {"group": name, "customers": len(part)}
        for metric in ("converted", "revenue", "profit", "costs"):
            e = mean_ci(part[metric].to_numpy())
            key = "conversion" if metric == "converted" else metric
            row |= {key: e.value, f"{key}_low": e.low, f"{key}_high": e.high}
        rows.append(row)
    groups = pd.DataFrame(rows)
    difference = {key: diff_ci(g["treated"][metric].to_numpy(), g["holdout"][metric].to_numpy())
                  for key, metric in (("conversion", "converted"), ("revenue", "revenue"), ("profit", "profit"))}
    return Report(
        since=since, until=until, attribution_days=attribution_days, margin=margin, churn_window=churn_window,
        customers=out, groups=groups, difference=difference, tiers=_tiers(out), offers=_offers(out, fb),
        send_time=_send_time(decisions, fb, wh.timezones), kpis=_kpis(decisions, out, fb, wh.earlier),
        counts=counts, notes=notes,
    )


def _tiers(out: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for tier in [t for t in TIERS if t in set(out["risk_tier"])]:
        for group in GROUPS:
            part = out[(out["risk_tier"] == tier) & (out["group"] == group)]
            e = rate_ci(int(part["churned"].sum()), len(part))
            rows.append({"tier": tier, "group": group, "customers": len(part), "churn_rate": e.value,
                         "low": e.low, "high": e.high})
    return pd.DataFrame(rows, columns=["tier", "group", "customers", "churn_rate", "low", "high"])


def _offers(out: pd.DataFrame, fb: pd.DataFrame) -> pd.DataFrame:
    held = out[out["group"] == "holdout"]
    sent = fb[fb["sent"].astype(bool)]
    rows = []
    for offer, part in out[out["group"] == "treated"].groupby("offer", sort=True):
        control = held[held["offer"] == offer]
        versus = "the control group meant for it"
        if len(control) < MIN_GROUP:
            control, versus = held, "the whole control group"
        e = diff_ci(part["converted"].to_numpy(), control["converted"].to_numpy())
        if len(part) < MIN_GROUP:  # a handful of customers: a point estimate, no interval
            e = Estimate(e.value, math.nan, math.nan, e.n)
        msgs = sent[sent["offer_id"].fillna(NO_OFFER) == offer] if offer != NO_OFFER else sent[sent["offer_id"].isna()]
        rows.append({"offer": offer, "treated": len(part), "control": len(control), "versus": versus,
                     "predicted_uplift": float(np.nanmean(part["predicted_uplift"])) if part["predicted_uplift"]
                     .notna().any() else math.nan,
                     "treated_conversion": float(part["converted"].mean()),
                     "control_conversion": float(control["converted"].mean()) if len(control) else math.nan,
                     "realised_uplift": e.value, "low": e.low, "high": e.high,
                     "attributed_conversion": float(msgs["converted"].mean()) if len(msgs) else math.nan})
    return pd.DataFrame(rows, columns=["offer", "treated", "control", "versus", "predicted_uplift",
                                       "treated_conversion", "control_conversion", "realised_uplift", "low", "high",
                                       "attributed_conversion"])


def _send_time(decisions: pd.DataFrame, fb: pd.DataFrame, timezones: dict[str, str]) -> pd.DataFrame:
    sent = fb[fb["sent"].astype(bool) & fb["sent_at"].notna()].merge(
        decisions[["exposure_id", "send_at"]].dropna(subset=["exposure_id"]), on="exposure_id")
    sent = sent[sent["send_at"].notna()]
    rows = []
    if len(sent):
        tz = sent["customer_id"].map(timezones).fillna("UTC")
        same = np.zeros(len(sent), dtype=bool)
        for zone in tz.unique():
            m = (tz == zone).to_numpy()
            same[m] = (sent.loc[m, "sent_at"].dt.tz_convert(zone).dt.hour.to_numpy()
                       == sent.loc[m, "send_at"].dt.tz_convert(zone).dt.hour.to_numpy())
        for label, m in (("recommended hour", same), ("other hours", ~same)):
            e = rate_ci(int(sent.loc[m, "opened"].astype(bool).sum()), int(m.sum()))
            rows.append({"sent_in": label, "messages": int(m.sum()), "open_rate": e.value, "low": e.low,
                         "high": e.high})
    return pd.DataFrame(rows, columns=["sent_in", "messages", "open_rate", "low", "high"])


def _kpis(decisions: pd.DataFrame, out: pd.DataFrame, fb: pd.DataFrame, earlier: set[str]) -> pd.DataFrame:
    acted = decisions[~decisions["holdout"] & (decisions["action"] != "none") & decisions["exposure_id"].notna()]
    sent = fb[fb["sent"].astype(bool)]
    rows = []

    def add(kpi: str, group: str, k: int, n: int, what: str) -> None:
        e = rate_ci(k, n)
        rows.append({"kpi": kpi, "group": group, "value": e.value, "low": e.low, "high": e.high, "n": n,
                     "what": what})

    add("reach rate", "treated", len(sent), len(acted), "messages sent per decision with an action")
    for kpi, col in (("open rate", "opened"), ("click rate", "clicked"), ("conversion rate", "converted")):
        add(kpi, "treated", int(sent[col].astype(bool).sum()), len(sent), f"{col} per message sent (feedback)")
    for group in GROUPS:
        part = out[out["group"] == group]
        before = part[part["customer_id"].isin(earlier)]
        add("repurchase rate", group, int(before["converted"].sum()), len(before),
            "customers with an earlier purchase who bought again in the window")
        add("churn rate", group, int(part["churned"].sum()), len(part), "see the churn definition")
        add("purchase rate", group, int(part["converted"].sum()), len(part), "customers who bought in the window")
    return pd.DataFrame(rows)


def build(home: Path, engine, *, since: datetime | None, until: datetime | None, attribution_days: int,
          margin: float, horizon_days: int, on_step=None) -> Report:
    """Read everything and analyse it; raises :class:`ReportError` when there is nothing to report on."""
    step = on_step or (lambda _: None)
    where = engine.url.render_as_string(hide_password=True)
    period = " ".join(([f"from {since:%Y-%m-%d %H:%M}Z"] if since else [])
                      + ([f"before {until:%Y-%m-%d %H:%M}Z"] if until else [])) or "at all"
    decisions = load_decisions(engine, since, until)
    step("decisions")
    if decisions.empty:
        raise ReportError(f"no decisions {period} in the decision log ({where}): run `engage score` or call the "
                          "scoring API first")
    customers, switched = assign(decisions)
    if customers.empty:
        raise ReportError(f"none of the {len(decisions):,} decisions {period} has an action or an intended action: "
                          "nothing to measure")
    sizes = customers["group"].value_counts()
    if sizes.get("holdout", 0) < 2 or sizes.get("treated", 0) < 2:
        raise ReportError(f"{sizes.get('treated', 0):,} treated and {sizes.get('holdout', 0):,} control-group "
                          f"customers {period}: both groups are needed (is the policy's holdout.share 0?)")
    exposures = decisions["exposure_id"].dropna().tolist()
    fb = load_feedback(engine, exposures)
    step("feedback")
    if fb.empty:
        raise ReportError(f"no feedback yet for the {len(exposures):,} messages decided {period} ({where}): post "
                          "it (POST /v1/feedback) or simulate it (`engage simulate-respond`) first")
    customers["start"] = customers["decided_at"]
    customers["end"] = customers["decided_at"] + pd.Timedelta(days=attribution_days)
    wh = load_warehouse(home, customers, horizon_days)
    step("warehouse")
    notes = []
    if switched:
        notes.append(f"{switched:,} customers were in both groups in this period (a new holdout salt?): each "
                     "is counted in the group of their first decision")
    if wh.data_end is not None:
        # The last event is a proxy for how far the data goes: allow a little quiet time before it ends.
        slack = max(timedelta(hours=1), timedelta(days=attribution_days) * 0.05)
        short = int((customers["end"] > wh.data_end + slack).sum())
        if short:
            notes.append(f"the attribution window of {short:,} customers ends after the last loaded event "
                         f"({wh.data_end:%Y-%m-%d %H:%M}Z): their outcomes are not complete yet")
    counts = {"decisions": len(decisions), "treated": int(sizes.get("treated", 0)),
              "holdout": int(sizes.get("holdout", 0)), "feedback": len(fb)}
    last = decisions["decided_at"].max().to_pydatetime()
    report = analyse(decisions, fb, wh, customers, margin=margin, horizon_days=horizon_days,
                     attribution_days=attribution_days, since=since, until=until or last, counts=counts, notes=notes)
    step("analysis")
    return report
