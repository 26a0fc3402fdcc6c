"""Charts logged with each run (PNG, matplotlib without a display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from training.evaluate import calibration_table  # noqa: E402


def roc_plot(y: np.ndarray, scores: dict[str, np.ndarray], path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, s in scores.items():
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


def calibration_plot(y: np.ndarray, probs: dict[str, np.ndarray], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, p in probs.items():
        pred, obs, _ = calibration_table(y, p)
        ax.plot(pred, obs, marker="o", label=name)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="predicted churn probability", ylabel="observed churn rate", title="Calibration (holdout)")
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path)


def lift_plot(y: np.ndarray, score: np.ndarray, path: Path) -> Path:
    order = np.argsort(-score, kind="stable")
    deciles = np.array_split(y[order], 10)
    rates = [d.mean() for d in deciles]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(range(1, 11), np.array(rates) / max(y.mean(), 1e-9))
    ax.axhline(1.0, color="grey", ls="--", lw=0.8)
    ax.set(xlabel="decile of predicted risk (1 = highest)", ylabel="lift over base rate", title="Lift (holdout)")
    return save_figure(fig, path)


def importance_plot(names: list[str], gains: np.ndarray, path: Path, top: int = 20) -> Path:
    idx = np.argsort(gains)[::-1][:top][::-1]
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(idx) + 1))
    ax.barh([names[i] for i in idx], gains[idx])
    ax.set(xlabel="total gain", title="Feature importance")
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    """Lay out, write as PNG and close: every chart a run logs goes through here."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
