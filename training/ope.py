"""Off-policy evaluation of offer policies on a logged campaign: IPW, self-normalized IPW, doubly robust.

Everything is a pure function of arrays. Arms are columns ``0..K-1`` (``0`` is the control, no offer); a
policy is an ``(n, K)`` matrix of the probabilities it gives each arm on each logged send (one-hot for a
deterministic policy). ``arm`` is the logged arm per send, ``propensity`` the probability the logging
policy gave it, ``reward`` what the send earned and ``q_hat`` a model's predicted reward per arm.

Confidence intervals use the normal approximation of each estimator's influence terms, summed per
cluster first when ``clusters`` is given (sends to the same customer are not independent).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Estimate:
    """A policy value with its 95% confidence interval."""

    value: float
    lo: float
    hi: float


def mean_ci(terms: np.ndarray, clusters: np.ndarray | None = None, center: float | None = None) -> Estimate:
    """Mean of per-send terms with a cluster-robust normal 95% interval.

    Args:
        terms: one influence term per send.
        clusters: cluster label per send (e.g. customer); None treats every send as its own cluster.
        center: the estimate to put the interval around (default: the mean of ``terms``); the spread
            is always that of ``terms`` around their mean.
    """
    terms = np.asarray(terms, dtype=float)
    n = len(terms)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"))
    value = float(terms.mean())
    dev = terms - value
    if clusters is not None:
        dev = pd.Series(dev).groupby(np.asarray(clusters), sort=False).sum().to_numpy()
    g = len(dev)
    var = float((dev**2).sum()) / n**2 * (g / (g - 1) if g > 1 else 1.0)
    c = value if center is None else center
    half = Z95 * np.sqrt(var)
    return Estimate(c, c - half, c + half)


def _ratio(target: np.ndarray, arm: np.ndarray, propensity: np.ndarray) -> np.ndarray:
    """Importance weight of each logged send: target probability of its arm over the logging one."""
    return target[np.arange(len(arm)), arm] / propensity


def ipw(target: np.ndarray, arm: np.ndarray, propensity: np.ndarray, reward: np.ndarray,
        clusters: np.ndarray | None = None) -> Estimate:
    """Inverse propensity weighting: mean of w * reward (unbiased, high variance)."""
    return mean_ci(_ratio(target, arm, propensity) * reward, clusters)


def snips(target: np.ndarray, arm: np.ndarray, propensity: np.ndarray, reward: np.ndarray,
          clusters: np.ndarray | None = None) -> Estimate:
    """Self-normalized IPW: sum(w * reward) / sum(w); its interval by the delta method."""
    w = _ratio(target, arm, propensity)
    if w.sum() <= 0:
        return Estimate(float("nan"), float("nan"), float("nan"))
    value = float((w * reward).sum() / w.sum())
    influence = w * (reward - value) / w.mean()  # mean zero at the estimate
    est = mean_ci(influence, clusters)
    return Estimate(value, value + est.lo - est.value, value + est.hi - est.value)


def dr(target: np.ndarray, arm: np.ndarray, propensity: np.ndarray, reward: np.ndarray, q_hat: np.ndarray,
       clusters: np.ndarray | None = None) -> Estimate:
    """Doubly robust: the model's value of the policy plus the IPW-weighted residual of the logged arm."""
    rows = np.arange(len(arm))
    direct = (target * q_hat).sum(axis=1)
    terms = direct + _ratio(target, arm, propensity) * (reward - q_hat[rows, arm])
    return mean_ci(terms, clusters)


def dr_logging(arm: np.ndarray, reward: np.ndarray, q_hat: np.ndarray, mix: np.ndarray,
               clusters: np.ndarray | None = None) -> Estimate:
    """DR value of the logging policy itself, whose importance weight is exactly 1 on every send.

    Only the logged arm's propensity is known, so the direct part uses ``mix`` (an ``(n, K)`` estimate
    of the logging probabilities, e.g. the arm mix per channel); the residual of the logged arm corrects
    it, so the estimate stays close to the on-policy mean reward whatever the model.
    """
    rows = np.arange(len(arm))
    return mean_ci((mix * q_hat).sum(axis=1) + reward - q_hat[rows, arm], clusters)


def greedy(scores: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """One-hot policy on the highest score among the allowed arms (ties: the lowest arm, the control)."""
    masked = np.where(allowed, scores, -np.inf)
    out = np.zeros_like(scores, dtype=float)
    out[np.arange(len(scores)), masked.argmax(axis=1)] = 1.0
    return out


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


def policy_table(policies: dict[str, np.ndarray], arm: np.ndarray, propensity: np.ndarray, reward: np.ndarray,
                 q_hat: np.ndarray, clusters: np.ndarray | None = None) -> pd.DataFrame:
    """IPW, SNIPS and DR estimates (value, lo, hi) of each named policy, one row per policy."""
    rows = []
    for name, target in policies.items():
        ests = {"ipw": ipw(target, arm, propensity, reward, clusters),
                "snips": snips(target, arm, propensity, reward, clusters),
                "dr": dr(target, arm, propensity, reward, q_hat, clusters)}
        row: dict[str, object] = {"policy": name}
        for est_name, e in ests.items():
            row.update({est_name: e.value, f"{est_name}_lo": e.lo, f"{est_name}_hi": e.hi})
        rows.append(row)
    return pd.DataFrame(rows)
