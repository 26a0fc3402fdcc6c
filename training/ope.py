"""Offer policies on a logged campaign: rewards, the uplift decision rule, and off-policy evaluation.

Pure functions of arrays and frames. Arms are columns ``0..K-1`` (``0`` is the control, no offer); a policy is
an ``(n, K)`` matrix of the probabilities it gives each arm on each logged send (one-hot when deterministic).
``arm`` is the logged arm per send, ``propensity`` the probability the logging policy gave it, ``reward``
what the send earned and ``q_hat`` a model's predicted reward per arm (the direct-method part of DR).
Estimators: inverse propensity weighting (IPW), self-normalized IPW (SNIPS) and doubly robust (DR).

Confidence intervals are normal approximations of each estimator's influence terms, summed per cluster
first when ``clusters`` is given (sends to the same customer are not independent).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from training.plots import save_figure  # also selects the Agg backend

log = logging.getLogger(__name__)
Z95 = 1.959963984540054
ESTIMATORS = ("ipw", "snips", "dr")


@dataclass(frozen=True)
class Estimate:
    """A policy value with its 95% confidence interval."""

    value: float
    lo: float
    hi: float


def logged_rewards(df: pd.DataFrame, offers: pd.DataFrame, margin: float) -> pd.DataFrame:
    """Logged sends with ``offer_id`` None for the control, ``offer_cost``, ``reward`` = converted * (revenue *
    margin - cost), and missing propensities filled with the arm's share of the channel's sends (off-policy
    estimates are then only approximate)."""
    df = df.reset_index(drop=True).copy()
    offer = df["offer_id"].astype("string").replace("", pd.NA)
    df["offer_id"] = offer.astype(object).where(offer.notna(), None)
    df["offer_cost"] = offer.map(dict(zip(offers["offer_id"], offers["cost"], strict=True))).astype(float).fillna(0.0)
    converted = df["converted"].astype(bool).to_numpy()
    df["reward"] = converted * (pd.to_numeric(df["revenue"]).fillna(0).to_numpy() * margin - df["offer_cost"])
    prop = pd.to_numeric(df["propensity"], errors="coerce")
    if prop.isna().any():
        arm = offer.fillna("")
        share = arm.groupby([df["channel"], arm]).transform("size") / arm.groupby(df["channel"]).transform("size")
        log.warning("%d sends have no logged propensity: using the arm's share of the channel", prop.isna().sum())
        prop = prop.fillna(share)
    df["propensity"] = prop.clip(lower=1e-3)
    return df


def mean_ci(terms: np.ndarray, clusters: np.ndarray | None = None) -> Estimate:
    """Mean of per-send terms with a cluster-robust normal 95% interval (each send its own cluster if None)."""
    terms = np.asarray(terms, dtype=float)
    n = len(terms)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"))
    value = float(terms.mean())
    dev = terms - value
    if clusters is not None:
        dev = pd.Series(dev).groupby(np.asarray(clusters), sort=False).sum().to_numpy()
    g = len(dev)
    half = Z95 * np.sqrt(float((dev**2).sum()) / n**2 * (g / (g - 1) if g > 1 else 1.0))
    return Estimate(value, value - half, value + half)


def _ratio(target: np.ndarray, arm: np.ndarray, propensity: np.ndarray) -> np.ndarray:
    """Importance weight of each logged send: the target's probability of its arm over the logging one."""
    return target[np.arange(len(arm)), arm] / propensity


def ipw(target: np.ndarray, arm: np.ndarray, propensity: np.ndarray, reward: np.ndarray,
        clusters: np.ndarray | None = None) -> Estimate:
    """Inverse propensity weighting: the mean of weight * reward (unbiased, high variance)."""
    return mean_ci(_ratio(target, arm, propensity) * reward, clusters)


def snips(target: np.ndarray, arm: np.ndarray, propensity: np.ndarray, reward: np.ndarray,
          clusters: np.ndarray | None = None) -> Estimate:
    """Self-normalized IPW: sum(weight * reward) / sum(weight); its interval by the delta method."""
    w = _ratio(target, arm, propensity)
    if w.sum() <= 0:
        return Estimate(float("nan"), float("nan"), float("nan"))
    value = float((w * reward).sum() / w.sum())
    spread = mean_ci(w * (reward - value) / w.mean(), clusters)  # influence terms, mean zero at the estimate
    return Estimate(value, value + spread.lo - spread.value, value + spread.hi - spread.value)


def dr(target: np.ndarray, arm: np.ndarray, propensity: np.ndarray, reward: np.ndarray, q_hat: np.ndarray,
       clusters: np.ndarray | None = None) -> Estimate:
    """Doubly robust: the model's value of the policy plus the weighted residual of the logged arm."""
    rows = np.arange(len(arm))
    terms = (target * q_hat).sum(axis=1) + _ratio(target, arm, propensity) * (reward - q_hat[rows, arm])
    return mean_ci(terms, clusters)


def dr_logging(arm: np.ndarray, reward: np.ndarray, q_hat: np.ndarray, mix: np.ndarray,
               clusters: np.ndarray | None = None) -> Estimate:
    """DR value of the logging policy itself, whose importance weight is exactly 1 on every send.

    Only the logged arm's propensity is known, so the direct part uses ``mix``, an ``(n, K)`` estimate of
    the logging probabilities (e.g. the arm mix per channel); the logged arm's residual corrects it, so
    the estimate stays close to the on-policy mean reward whatever the model.
    """
    return mean_ci((mix * q_hat).sum(axis=1) + reward - q_hat[np.arange(len(arm)), arm], clusters)


def uniform(allowed: np.ndarray) -> np.ndarray:
    """Uniformly random over the allowed arms."""
    a = allowed.astype(float)
    return a / a.sum(axis=1, keepdims=True)


def constant(arm: int, allowed: np.ndarray, fallback: int = 0) -> np.ndarray:
    """Always ``arm`` where it is allowed, else ``fallback`` (the control)."""
    out = np.zeros(allowed.shape, dtype=float)
    ok = allowed[:, arm]
    out[ok, arm] = 1.0
    out[~ok, fallback] = 1.0
    return out


def allowed_arms(channels: pd.Series | None, arm_channels: list[frozenset[str]], n: int) -> np.ndarray:
    """(n, K) whether each arm may go out on each row's channel (an empty set or unknown channel: all)."""
    out = np.ones((n, len(arm_channels)), dtype=bool)
    if channels is None:
        return out
    ch = channels.astype("string").fillna("").to_numpy()
    for k, allowed in enumerate(arm_channels):
        if allowed:
            out[:, k] = np.isin(ch, list(allowed)) | (ch == "")
    return out


def incremental_profit(p: np.ndarray, revenue: np.ndarray, costs: np.ndarray, margin: float) -> np.ndarray:
    """(n, K) profit of each arm over sending no offer; column 0 (the control) is 0."""
    return (p - p[:, :1]) * margin * revenue[:, None] - p * costs[None, :]


def best_arms(profit: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """The allowed arm of highest profit: the control (0) unless some offer's profit is strictly positive."""
    masked = np.where(allowed, profit, -np.inf)
    masked[:, 0] = 0.0
    return masked.argmax(axis=1)  # ties, e.g. an offer with no uplift and no cost, go to the control


def true_profit_metrics(true: np.ndarray, choice: np.ndarray, best_arm: int,
                        logging_mix: np.ndarray) -> dict[str, float]:
    """Mean true profit of the learned policy (``choice``), the per-row oracle and the baselines.

    Args:
        true: (n, K) true incremental profit of each arm (column 0, no offer, is 0).
        choice: the learned policy's arm per row; best_arm: the best single arm.
        logging_mix: (n, K) the logging policy's probabilities.
    """
    oracle = float(true.max(axis=1).mean())
    out = {
        "true_profit_policy": float(true[np.arange(len(true)), choice].mean()),
        "true_profit_oracle": oracle,
        "true_profit_logging": float((logging_mix * true).sum(axis=1).mean()),
        "true_profit_random": float(true.mean()),
        "true_profit_best_single": float(true[:, best_arm].mean()),
        "true_profit_no_offer": float(true[:, 0].mean()),
        "true_offer_share": float((choice > 0).mean()),
    }
    out["true_profit_ratio_to_oracle"] = out["true_profit_policy"] / oracle if oracle > 0 else float("nan")
    return out


def _row(name: str, arm: str, ests: dict[str, Estimate]) -> dict[str, object]:
    row: dict[str, object] = {"policy": name, "arm": arm}
    for est, e in ests.items():
        row.update({est: e.value, f"{est}_lo": e.lo, f"{est}_hi": e.hi})
    return row


def evaluate_policies(choice: np.ndarray, q_hat: np.ndarray, allowed: np.ndarray, arm: np.ndarray,
                      propensity: np.ndarray, reward: np.ndarray, channel: np.ndarray, clusters: np.ndarray,
                      arm_names: list[str]) -> tuple[pd.DataFrame, int]:
    """IPW, SNIPS and DR values of a learned policy and the baselines on the logged sends.

    Args:
        choice: the learned policy's arm per send.
        q_hat, allowed: (n, K) predicted reward and whether each arm may go out on the send's channel.
        arm, propensity, reward, channel, clusters: the logged arm (K-1 may be a catch-all column that no
            policy picks), its logging probability, the reward, the channel and the customer per send.
        arm_names: the K arm names, control first.

    Returns:
        One row per policy (``policy, arm, ipw, ipw_lo, ipw_hi, snips, ..., dr_hi``): ``policy``,
        ``random`` (uniform over allowed arms), ``no_offer``, ``always_<offer>``, ``best_single`` (the
        single arm, no offer included, of highest DR value) and ``logging``; and the best single arm.
    """
    k = q_hat.shape[1]
    policies = {"policy": np.eye(k)[choice], "random": uniform(allowed), "no_offer": constant(0, allowed)}
    policies |= {f"always_{a}": constant(j, allowed) for j, a in enumerate(arm_names) if j and allowed[:, j].any()}
    rows = []
    for name, target in policies.items():
        ests = {"ipw": ipw(target, arm, propensity, reward, clusters),
                "snips": snips(target, arm, propensity, reward, clusters),
                "dr": dr(target, arm, propensity, reward, q_hat, clusters)}
        rows.append(_row(name, name.removeprefix("always_") if name.startswith("always_") else "", ests))
    table = pd.DataFrame(rows)
    table.loc[table["policy"] == "no_offer", "arm"] = arm_names[0]
    singles = table[(table["policy"] == "no_offer") | table["policy"].str.startswith("always_")]
    best = singles.loc[singles["dr"].idxmax()]
    best_arm = arm_names.index(best["arm"])
    # The logging policy scores itself with weight 1 (IPW = SNIPS = the on-policy mean); DR's direct part
    # uses the logged arm mix per channel.
    mix = pd.DataFrame(np.eye(k)[arm]).groupby(channel).transform("mean").to_numpy()
    on = mean_ci(reward, clusters)
    logging = _row("logging", "", {"ipw": on, "snips": on, "dr": dr_logging(arm, reward, q_hat, mix, clusters)})
    extra = pd.DataFrame([{**best.to_dict(), "policy": "best_single"}, logging])
    table = pd.concat([table, extra], ignore_index=True)
    return table, best_arm



def flat_metrics(table: pd.DataFrame, policies: tuple[str, ...]) -> dict[str, float]:
    """``<estimator>_<policy>_value`` and its ``_lo``/``_hi`` for the named policies of ``evaluate_policies``."""
    out: dict[str, float] = {}
    for _, row in table[table["policy"].isin(policies)].iterrows():
        for est in ESTIMATORS:
            for suffix in ("", "_lo", "_hi"):
                out[f"{est}_{row['policy']}_value{suffix}"] = float(row[est + suffix])
    return out


def policy_value_plot(table: pd.DataFrame, policies: tuple[str, ...], path: Path) -> Path:
    """Each policy's IPW, SNIPS and DR value with its 95% interval."""
    rows = table.set_index("policy").loc[list(policies)]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, est in enumerate(ESTIMATORS):
        v = rows[est].to_numpy(float)
        err = np.vstack([v - rows[f"{est}_lo"].to_numpy(float), rows[f"{est}_hi"].to_numpy(float) - v])
        ax.errorbar(x + (i - 1) * 0.22, v, yerr=err, fmt="o", capsize=3, label=est.upper())
    labels = [f"{p}\n({a})" if a else p for p, a in zip(rows.index, rows["arm"], strict=True)]
    ax.set_xticks(x, labels, fontsize=8)
    ax.axhline(0, color="grey", lw=0.6)
    ax.set(ylabel="profit per send", title="Policy value on held-out sends (95% CI)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def uplift_plot(arms: list[str], series: dict[str, np.ndarray], path: Path) -> Path:
    """Mean uplift in conversion probability (p_arm - p_none) per offer, one bar per series."""
    x = np.arange(len(arms))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    width = 0.8 / max(1, len(series))
    for i, (name, v) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, v, width, label=name)
    ax.set_xticks(x, arms)
    ax.axhline(0, color="grey", lw=0.6)
    ax.set(ylabel="mean p_arm - p_none", title="Uplift by offer")
    ax.legend(fontsize=8)
    return save_figure(fig, path)
