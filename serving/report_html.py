"""The outcome report as charts (matplotlib PNGs) and one self-contained HTML page (PNGs inlined as base64).

Pure presentation of a :class:`serving.report.Report`: no reading, no statistics.
"""

from __future__ import annotations

import base64
import html
import math
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from serving.report import GROUPS, Estimate, Report  # noqa: E402
from training.plots import save_figure  # noqa: E402

COLORS = {"treated": "#4f81bd", "holdout": "#9e9e9e"}


def _err(values, lows, highs) -> np.ndarray:
    """Error bar lengths (2, n): none where there is no interval, never negative (rounding at 0 and 1)."""
    values, lows, highs = (np.asarray(v, dtype=float) for v in (values, lows, highs))
    return np.maximum(np.vstack([np.nan_to_num(values - lows), np.nan_to_num(highs - values)]), 0.0)


def _bars(ax, labels, values, lows, highs, colors) -> None:
    ax.bar(labels, np.nan_to_num(np.asarray(values, dtype=float)), yerr=_err(values, lows, highs), capsize=5,
           color=colors)


def outcomes_chart(r: Report, path: Path) -> Path:
    """Conversion, revenue and profit per customer, treated vs holdout, with 95% intervals."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    g = r.groups.set_index("group").loc[list(GROUPS)]
    for ax, (key, title) in zip(axes, (("conversion", "Customers who bought"), ("revenue", "Revenue per customer"),
                                       ("profit", "Profit per customer")), strict=True):
        _bars(ax, list(GROUPS), g[key], g[f"{key}_low"], g[f"{key}_high"], [COLORS[x] for x in GROUPS])
        ax.set(title=title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    return save_figure(fig, path)


def difference_chart(r: Report, path: Path) -> Path:
    """Treated minus holdout per customer with 95% intervals; zero is no effect."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 2.6))
    for ax, key, label in zip(axes, ("conversion", "revenue", "profit"),
                              ("conversion (points)", "revenue", "profit"), strict=True):
        e = r.difference[key]
        scale = 100.0 if key == "conversion" else 1.0
        color = "#2e7d32" if e.low > 0 else "#c62828" if e.high < 0 else "#616161"
        ax.errorbar([e.value * scale], [0], xerr=_err([e.value], [e.low], [e.high]) * scale,
                    fmt="o", color=color, capsize=6, markersize=8)
        ax.axvline(0, color="black", lw=0.8, ls="--")
        ax.set(yticks=[], title=f"{label}: treated - holdout")
        span = float(np.nanmax([abs(e.low), abs(e.high), abs(e.value), 1e-9])) * scale * 1.3
        ax.set_xlim(-span, span)
    return save_figure(fig, path)


def tiers_chart(r: Report, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    tiers = list(dict.fromkeys(r.tiers["tier"]))
    x = np.arange(len(tiers))
    for k, group in enumerate(GROUPS):
        part = r.tiers[r.tiers["group"] == group].set_index("tier").reindex(tiers)
        v, lo, hi = (part[c].to_numpy(float) for c in ("churn_rate", "low", "high"))
        ax.bar(x + (k - 0.5) * 0.38, np.nan_to_num(v), 0.38, color=COLORS[group], label=group,
               yerr=_err(v, lo, hi), capsize=4)
    ax.set(xticks=x, xticklabels=tiers, xlabel="risk tier at the decision", ylabel="churn rate",
           title="Churn rate per tier")
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.legend()
    return save_figure(fig, path)


def offers_chart(r: Report, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4))
    o = r.offers
    x = np.arange(len(o))
    ax.bar(x - 0.19, np.nan_to_num(o["predicted_uplift"].to_numpy(float)), 0.38, color="#f0ad4e",
           label="predicted (vs a message without offer)")
    v, lo, hi = (o[c].to_numpy(float) for c in ("realised_uplift", "low", "high"))
    ax.bar(x + 0.19, np.nan_to_num(v), 0.38, color=COLORS["treated"], label="realised (vs control group)",
           yerr=_err(v, lo, hi), capsize=4)
    ax.axhline(0, color="black", lw=0.8)
    labels = [f"{offer}\n(n={n:,})" for offer, n in zip(o["offer"], o["treated"], strict=True)]
    ax.set(xticks=x, xticklabels=labels, ylabel="conversion uplift", title="Offer uplift")
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def send_time_chart(r: Report, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    s = r.send_time
    if len(s):
        _bars(ax, s["sent_in"], s["open_rate"], s["low"], s["high"], ["#2e7d32", "#9e9e9e"][: len(s)])
    ax.set(ylabel="open rate", title="Open rate by send hour")
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    return save_figure(fig, path)


def funnel_chart(r: Report, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    k = r.kpis[r.kpis["group"] == "treated"].set_index("kpi")
    names = [n for n in ("reach rate", "open rate", "click rate", "conversion rate") if n in k.index]
    _bars(ax, names, k.loc[names, "value"], k.loc[names, "low"], k.loc[names, "high"], COLORS["treated"])
    ax.set(title="Messages: reach, open, click, convert")
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    return save_figure(fig, path)


CHARTS = {"outcomes": outcomes_chart, "difference": difference_chart, "churn_by_tier": tiers_chart,
          "offers": offers_chart, "send_time": send_time_chart, "funnel": funnel_chart}


def draw_charts(r: Report, folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return {name: draw(r, folder / f"{name}.png") for name, draw in CHARTS.items()}


# -- HTML ------------------------------------------------------------------------------------------------


def _fmt(x: float, kind: str = "num") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if kind == "pct":
        return f"{x:.1%}"
    if kind == "pp":
        return f"{100 * x:+.2f} pts"
    if kind == "int":
        return f"{int(x):,}"
    return f"{x:,.2f}"


def _interval(e: Estimate, kind: str = "num") -> str:
    return f"{_fmt(e.value, kind)} [{_fmt(e.low, kind)}, {_fmt(e.high, kind)}]"


def _table(df: pd.DataFrame, formats: dict[str, str]) -> str:
    head = "".join(f"<th>{html.escape(str(c).replace('_', ' '))}</th>" for c in df.columns)
    body = []
    for row in df.itertuples(index=False):
        cells = []
        for c, v in zip(df.columns, row, strict=True):
            text = _fmt(v, formats[c]) if c in formats else html.escape(str(v))
            cells.append(f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:0.6em 0 1.4em}td,th{border-bottom:1px solid #ddd;padding:4px 10px;
text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}img{max-width:100%}
.headline{font-size:1.25em;padding:0.8em 1em;border-radius:6px;background:#f4f6fa;border-left:6px solid #4f81bd}
.positive{border-left-color:#2e7d32}.negative{border-left-color:#c62828}.note{color:#8a6d3b}small{color:#666}"""


def render_html(r: Report, charts: dict[str, Path], generated_at: datetime | None = None) -> str:
    generated_at = generated_at or datetime.now(UTC)
    p = r.difference["profit"]
    period = (f"from {r.since:%Y-%m-%d %H:%M}Z" if r.since else "up") + f" to {r.until:%Y-%m-%d %H:%M}Z"
    treated, held = r.counts["treated"], r.counts["holdout"]
    groups = r.groups[["group", "customers", "conversion", "revenue", "costs", "profit"]]
    notes = "".join(f"<p class='note'>Note: {html.escape(n)}</p>" for n in r.notes)
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>Engage outcome report</title>"
        f"<style>{_CSS}</style></head><body>",
        "<h1>Engage outcome report</h1>",
        f"<p>Decisions {html.escape(period)}; outcomes over {r.attribution_days} days after each decision; "
        f"margin {r.margin:.0%}. {treated:,} treated and {held:,} control-group customers (intention to treat: "
        f"everybody the policy acted on, or would have, whether or not the message went out). "
        f"<small>Generated {generated_at:%Y-%m-%d %H:%M}Z.</small></p>",
        f"<div class='headline {p.verdict.split()[0]}'>Incremental profit per customer (treated - holdout): "
        f"<b>{_interval(p)}</b> (95% interval) &mdash; {html.escape(p.verdict)}. "
        f"Over the {treated:,} treated customers: about {_fmt(p.value * treated)} "
        f"[{_fmt(p.low * treated)}, {_fmt(p.high * treated)}].</div>",
        notes,
        "<h2>Treated against the control group</h2>",
        _table(groups, {"customers": "int", "conversion": "pct", "revenue": "num", "costs": "num", "profit": "num"}),
        "<table><thead><tr><th>treated - holdout, per customer</th><th>estimate [95% interval]</th>"
        "<th>verdict</th></tr></thead><tbody>"
        + "".join(f"<tr><td>{k}</td><td>{_interval(e, 'pp' if k == 'conversion' else 'num')}</td>"
                  f"<td>{html.escape(e.verdict)}</td></tr>" for k, e in r.difference.items())
        + "</tbody></table>",
        _img(charts["outcomes"], "outcomes per group"), _img(charts["difference"], "differences"),
        "<h2>Churn rate per risk tier</h2>", f"<p>Churn here: {html.escape(r.churn_window)}.</p>",
        _table(r.tiers, {"customers": "int", "churn_rate": "pct", "low": "pct", "high": "pct"}),
        _img(charts["churn_by_tier"], "churn by tier"),
        "<h2>Offer uplift: realised against predicted</h2>",
        "<p>Predicted: the model's conversion uplift over a message without an offer, averaged over the customers "
        "who got the offer. Realised: their conversion (any purchase in the window) minus the control group's; it "
        "includes the effect of the message itself (no interval under 30 customers). Attributed: conversions per "
        "message sent, from feedback.</p>",
        _table(r.offers, {"treated": "int", "control": "int", "predicted_uplift": "pp", "treated_conversion": "pct",
                          "control_conversion": "pct", "realised_uplift": "pp", "low": "pp", "high": "pp",
                          "attributed_conversion": "pct"}),
        _img(charts["offers"], "offer uplift"),
        "<h2>Send time</h2><p>Open rate of messages sent in the recommended local hour against the others.</p>",
        _table(r.send_time, {"messages": "int", "open_rate": "pct", "low": "pct", "high": "pct"}),
        _img(charts["send_time"], "open rate by send hour"),
        "<h2>Engagement KPIs</h2>",
        _table(r.kpis, {"value": "pct", "low": "pct", "high": "pct", "n": "int"}),
        _img(charts["funnel"], "message funnel"),
        "<p><small>Intervals: 95%, normal approximation for means and differences (Welch), Wilson for rates. "
        "Profit = revenue x margin - offer costs of redeemed offers.</small></p></body></html>",
    ]
    return "\n".join(parts)
