"""Metrics shared by the pipelines: classification quality, lift, calibration."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, brier_score_loss, log_loss, roc_auc_score


def lift_capture(y: np.ndarray, score: np.ndarray, top: float = 0.1) -> tuple[float, float]:
    """Lift and capture rate of the top ``top`` share of customers ranked by ``score``."""
    n = max(1, int(round(len(y) * top)))
    order = np.argsort(-score, kind="stable")[:n]
    base = y.mean()
    hit = y[order].mean()
    return (float(hit / base) if base > 0 else float("nan"), float(y[order].sum() / max(1, y.sum())))


def binary_metrics(y: np.ndarray, p: np.ndarray, prefix: str = "") -> dict[str, float]:
    """ROC AUC, PR AUC, Brier, log loss, top-decile lift and capture of probabilities ``p``."""
    y = np.asarray(y, dtype=float)
    p = np.clip(np.asarray(p, dtype=float), 1e-6, 1 - 1e-6)
    lift, capture = lift_capture(y, p)
    return {
        f"{prefix}roc_auc": float(roc_auc_score(y, p)),
        f"{prefix}pr_auc": float(average_precision_score(y, p)),
        f"{prefix}brier": float(brier_score_loss(y, p)),
        f"{prefix}log_loss": float(log_loss(y, p, labels=[0, 1])),
        f"{prefix}lift_top_decile": lift,
        f"{prefix}capture_top_decile": capture,
    }


def calibration_table(y: np.ndarray, p: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean predicted and observed rate per quantile bin of ``p``: (predicted, observed, count)."""
    edges = np.unique(np.quantile(p, np.linspace(0, 1, bins + 1)))
    idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, len(edges) - 2)
    pred, obs, cnt = [], [], []
    for b in range(len(edges) - 1):
        m = idx == b
        if m.any():
            pred.append(p[m].mean())
            obs.append(y[m].mean())
            cnt.append(m.sum())
    return np.array(pred), np.array(obs), np.array(cnt)
